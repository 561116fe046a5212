"""Fine-tuning on chat data, with transformers and peft: the loop, top to bottom.

The data is what DSPy's `BootstrapFinetune` produces: `{"messages": [...]}` records
whose last message is the assistant's answer, and which may carry a "weight" (how much the
record counts against others, 1 by default). Only the answer's tokens (and the end-of-turn
token, so the model learns to stop) carry loss; the prompt is context.
`loss_weighting="fields"` weighs them so that every record counts the same and, within a
record, every output field's value counts as much as all of the adapter's markers together
(see `answer_weights`); "tokens" is a plain mean over the batch's answer tokens.
SmolLM2 pads with its end-of-turn token, so labels are masked by the attention mask,
never by the pad id.

The same loop runs data-parallel under a standard launcher, configuration only:
`TrainSettings(launcher="torchrun --standalone --nproc-per-node 4")` (or `accelerate launch
--num_processes 4`) makes `misstep.lm.launch.train` run it under that launcher, one process per
GPU (or CPU process, over gloo), each on its share of every batch, gradients averaged by
DistributedDataParallel; rank 0 writes the weights.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import AutoModelForCausalLM, AutoTokenizer

from misstep.data.runfiles import write_json_atomic
from misstep.lm.checkpoint import SUMMARY, weights_record
from misstep.lm.kernels import train_linears_through_onednn

LOSS_WEIGHTINGS = ("tokens", "fields")
# DSPy's ChatAdapter writes each output field as a "[[ ## name ## ]]" line and then its value.
FIELD_MARKER = re.compile(r"\[\[ ## \w+ ## \]\]")


@dataclass
class TrainSettings:
    """Every knob of a fine-tune, in one place (the CLI fills it from its options)."""

    method: str = "lora"  # "lora" or "full"
    epochs: float = 1.0
    learning_rate: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full
    lora_rank: int = 16
    lora_alpha: int | None = None  # None: twice lora_rank
    lora_dropout: float = 0.05
    max_length: int = 1024  # longer examples are cut from the left of the prompt, never the answer
    batch_size: int = 4
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    warmup_fraction: float = 0.1
    # AdamW's second-moment decay: its memory is about 1 / (1 - adam_beta2) steps, so the large
    # gradients of the first steps, while the adapter's format is learned, weigh on later updates.
    adam_beta2: float = 0.999
    seed: int = 0
    device: str | None = None  # None: CUDA where present, else CPU
    # A distributed launcher to train under, e.g. "torchrun --standalone --nproc-per-node 4" or
    # "accelerate launch --num_processes 4"; None trains in this process.
    launcher: str | None = None
    # How long launched training may run before its processes are killed and the call fails with
    # its log (None: no limit), and how long one process waits for the others at a collective
    # (gloo/NCCL default to 30 minutes, so one stuck process would hold the rest that long).
    launch_timeout_s: float | None = None
    collective_timeout_s: float = 600.0
    # fp32 matrix products on CPU through oneDNN rather than MKL (OneDNNTrainingLinear); False: MKL.
    onednn: bool = True
    # How often a training saves what it needs to resume (weights, optimizer, schedule, data
    # order, random state) to OUTPUT_DIR/resume.pt; None: never. A training started again into
    # the same folder on the same records and settings continues from there, launched or not.
    resume_every_s: float | None = 600.0
    # Run the tokens every row of a batch begins with once, not once a row: the same loss and
    # gradients (see answer_loss), fewer products a step where records share a stage's prompt.
    share_prefix: bool = True
    # How the answer tokens' losses are averaged: "tokens", one mean over the batch's answer
    # tokens, where a one-token field (a step number) is one token among the markers' dozens and
    # a long record outweighs a short one; or "fields", one mean per record in which each field's
    # value, and the markers together, weigh the same (answer_weights).
    loss_weighting: str = "tokens"

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', not {self.method!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, not {self.loss_weighting!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation", "max_length", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)


def value_spans(answer: str) -> list[tuple[int, int]]:
    """Character spans of the field values in an adapter's answer: the text between one marker and
    the next, without the whitespace around it. An answer without markers is one value."""
    markers = list(FIELD_MARKER.finditer(answer))
    if not markers:
        bounds = [(0, len(answer))]
    else:  # after the last marker ("completed") comes only the end of the turn
        bounds = [(before.end(), after.start()) for before, after in zip(markers, markers[1:])]
    spans = []
    for start, end in bounds:
        text = answer[start:end]
        stripped = text.strip()
        if stripped:
            start += len(text) - len(text.lstrip())
            spans.append((start, start + len(stripped)))
    return spans


def answer_weights(answer: str, offsets: list[tuple[int, int]], weighting: str) -> list[float]:
    """Each answer token's weight in the loss, from its character `offsets` in `answer`.

    "tokens": 1 each. "fields": the tokens fall into segments, one per field value (a token that
    touches a value belongs to it) and one for everything else (markers, blank lines, the end of
    the turn); each segment weighs 1 / segments, shared evenly by its tokens, so a record's weights
    sum to 1 and "has_mistake: True" and a one-token step number each count as much as the markers."""
    if weighting == "tokens":
        return [1.0] * len(offsets)
    spans = value_spans(answer)
    segment = [next((i for i, (s, e) in enumerate(spans) if start < e and end > s), -1) for start, end in offsets]
    sizes = Counter(segment)
    return [1.0 / (len(sizes) * sizes[i]) for i in segment]


def tokenize_chat(
    tokenizer, messages: list[dict[str, str]], max_length: int, weighting: str = "tokens"
) -> tuple[list[int], list[int], list[float]]:
    """(input ids, labels, loss weights) of one chat: labels are -100 everywhere but the final
    assistant turn, weights 0 there too and by `weighting` (answer_weights) on the answer."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training record must end with the assistant's message")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not extend the prompt with the answer")
    if weighting != "tokens" and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"loss_weighting={weighting!r} needs a fast tokenizer (its character offsets)")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer = full[len(prompt) :].rstrip("\n")
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=weighting != "tokens")
    answer_ids = encoded["input_ids"]
    weights = answer_weights(answer, encoded.get("offset_mapping") or [(0, 0)] * len(answer_ids), weighting)
    keep = max_length // 2  # an over-long answer is cut, keeping room for some prompt
    answer_ids, weights = answer_ids[:keep], weights[:keep]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, [0.0] * len(prompt_ids) + weights


def record_row(
    tokenizer, record: dict[str, Any], number: int, settings: TrainSettings
) -> tuple[list[int], list[int], list[float]]:
    """One training record as (input ids, labels, loss weights): its chat tokenized by
    `tokenize_chat`, the weights scaled by the record's own "weight" (1 where it has none), so
    that one kind of record can count for more than another."""
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(f"training record {number}: 'weight' must be a positive number, not {weight!r}")
    ids, labels, weights = tokenize_chat(tokenizer, record["messages"], settings.max_length, settings.loss_weighting)
    return ids, labels, [w * weight for w in weights]


class AnswerLoss(torch.nn.Module):
    """The model with `answer_loss` as its forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model, share_prefix: bool = False):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix

    def forward(self, input_ids, attention_mask, labels, weights) -> torch.Tensor:
        return answer_loss(
            self.model,
            {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights},
            share_prefix=self.share_prefix,
        )


# A shared prefix shorter than this is not worth a second forward call.
MIN_SHARED_PREFIX = 32


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row of `batch` has in common, all of them prompt (no loss,
    nor on the token after them), and leaving each row at least one token of its own."""
    ids, labels = batch["input_ids"], batch["labels"]
    same = (ids == ids[:1]).all(dim=0) & (batch["attention_mask"] == 1).all(dim=0)
    prompt = (labels == -100).all(dim=0)
    length = 0
    while length < ids.shape[1] - 1 and same[length] and prompt[length + 1]:
        length += 1
    return length


def answer_loss(model, batch: dict[str, torch.Tensor], share_prefix: bool = False) -> torch.Tensor:
    """Next-token loss over the answer tokens only, averaged by the batch's "weights" (a plain
    mean where they are all 1).

    The vocabulary projection runs on the answer positions alone: answers are a few
    dozen tokens of prompts that run to a thousand, and a 49k-word head over every
    position would cost more than the rest of the step.

    With `share_prefix`, the tokens every row begins with (a stage's adapter instructions, the
    same in every record of that stage) run once, as one row, and the rows continue from
    their keys and values, repeated per row: the same loss and gradients (the repeat's
    backward sums over rows), with the shared part's products computed once instead of once
    a row.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shared = shared_prefix_length(batch) if share_prefix and ids.shape[0] > 1 else 0
    if shared >= MIN_SHARED_PREFIX:
        prefix = causal_lm.model(input_ids=ids[:1, :shared], use_cache=True).past_key_values
        prefix.batch_repeat_interleave(ids.shape[0])
        hidden = causal_lm.model(
            input_ids=ids[:, shared:], attention_mask=mask, past_key_values=prefix, use_cache=True
        ).last_hidden_state
    else:
        shared = 0
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = batch["labels"][:, shared + 1 :]
    scored = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[scored], reduction="none")
    weights = batch["weights"][:, shared + 1 :][scored]
    return (losses * weights).sum() / weights.sum()


def _collate(rows: list[tuple[list[int], list[int], list[float]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _, _ in rows)
    return {  # right padding for training; padded positions carry no loss
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels, _ in rows]),
        "weights": torch.tensor([weights + [0.0] * (width - len(weights)) for _, _, weights in rows]),
    }


def _distributed() -> tuple[bool, int, int, int]:
    """(launched, rank, world size, local rank) from a launcher's environment; (False, 0, 1, 0) without one.
    A launched process joins a process group even when it is the only one, so a one-GPU run
    takes the multi-GPU code path."""
    return (
        "RANK" in os.environ,
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


KEPT_UNTIL_EXIT: list = []  # what a launched process must not free before it exits (see train_chat)


def train_chat(
    model_dir: Path,
    records: list[dict[str, Any]],
    output_dir: Path,
    settings: TrainSettings,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `model_dir` on chat `records`; write a full Hugging Face folder (LoRA merged in)
    to `output_dir` with `train_log.jsonl` (loss per step) and `train_summary.json`.

    Run under a launcher (`misstep.lm.launch`), each process trains on its share of every batch
    and rank 0 writes the weights; `settings.launcher` itself is for `launch.train`."""
    if not records:
        raise ValueError("no training records: nothing to fine-tune on")
    launched, rank, world, local_rank = _distributed()
    wanted = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = wanted.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}" if cuda and launched else wanted)  # one GPU per process
    if launched:
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=settings.collective_timeout_s)
        )
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    random.seed(settings.seed)  # the same on every rank: all ranks draw the same global batches
    torch.manual_seed(settings.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(device)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing is the kind DistributedDataParallel works with.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=settings.lora_rank,
                lora_alpha=settings.lora_alpha or 2 * settings.lora_rank,
                lora_dropout=settings.lora_dropout,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
        if settings.gradient_checkpointing:
            model.enable_input_require_grads()
    # Gradient checkpointing turns the key/value cache off, which the shared prefix needs.
    loss_of = AnswerLoss(model, share_prefix=settings.share_prefix and not settings.gradient_checkpointing)
    if launched:
        loss_of = torch.nn.parallel.DistributedDataParallel(loss_of, device_ids=[local_rank] if cuda else None)
        # Never freed in this process (main() leaves without tearing down): freeing DDP frees its
        # process group, whose gloo worker thread may still be releasing a finished collective,
        # which needs the GIL, while the thread freeing the group holds the GIL and waits for that
        # worker's lock. One run in ~10 of the torchrun test hung there (seen in gdb; the mechanism
        # pytorch/pytorch#179291 describes, the hang #75097 reports).
        KEPT_UNTIL_EXIT.append(loss_of)
    rows = [record_row(tokenizer, r, number, settings) for number, r in enumerate(records)]
    global_batch = settings.batch_size * world  # each rank trains on its slice of every batch
    steps_per_epoch = math.ceil(len(rows) / (global_batch * settings.gradient_accumulation))
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=(0.9, settings.adam_beta2), weight_decay=0.0)
    warmup = max(1, int(settings.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "train_log.jsonl" if rank == 0 else Path(os.devnull)
    order: list[int] = []
    model.train()
    # fp32 products through oneDNN on CPU (twice MKL's speed on this CPU); on GPU nothing changes.
    onednn = settings.onednn and device.type == "cpu" and torch.backends.mkldnn.is_available()
    if onednn:
        train_linears_through_onednn(model)
    started = time.perf_counter()
    trained_tokens = 0
    losses = []
    # Under a launcher every rank holds the same weights and optimizer state (DDP), so rank 0 alone
    # writes the resume point and every rank reads it back.
    resume = _Resume(output_dir / "resume.pt", data_key(records, settings)) if settings.resume_every_s else None
    first_step = 0
    if resume is not None and (state := resume.load()) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        random.setstate(state["python_random"])
        torch.set_rng_state(state["torch_random"])
        first_step, order, losses, trained_tokens = state["step"], state["order"], state["losses"], state["tokens"]
        started -= state["wall_seconds"]
        if rank == 0:
            _keep_log_lines(log_path, first_step)
    last_saved = time.perf_counter()
    with (
        log_path.open("a" if first_step else "w") as log,
        Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeRemainingColumn(),
            disable=not show_progress or rank != 0,
        ) as progress,
    ):
        task = progress.add_task("train", total=total_steps, completed=first_step, loss=float("nan"))
        for step in range(first_step, total_steps):
            step_started = time.perf_counter()
            step_loss = torch.zeros(2, device=device)  # (loss, tokens), summed over ranks for the log
            for _ in range(settings.gradient_accumulation):
                while len(order) < global_batch:
                    order += random.sample(range(len(rows)), len(rows))
                mine = order[:global_batch][rank::world]
                del order[:global_batch]
                batch = _collate([rows[i] for i in mine], tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = loss_of(**batch) / settings.gradient_accumulation
                loss.backward()
                step_loss += torch.stack([loss.detach().float(), batch["attention_mask"].sum().float()])
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if launched:
                torch.distributed.all_reduce(step_loss)
            step_loss_value, step_tokens = step_loss[0].item() / world, int(step_loss[1].item())
            trained_tokens += step_tokens
            losses.append(step_loss_value)
            seconds = time.perf_counter() - step_started
            log.write(
                json.dumps(
                    {
                        "step": step + 1,
                        "loss": step_loss_value,
                        "lr": schedule.get_last_lr()[0],
                        "tokens": step_tokens,
                        "seconds": seconds,
                    }
                )
                + "\n"
            )
            log.flush()
            progress.update(task, advance=1, loss=step_loss_value)
            if (
                resume is not None
                and rank == 0
                and step + 1 < total_steps
                and time.perf_counter() - last_saved >= settings.resume_every_s
            ):
                resume.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "python_random": random.getstate(),
                        "torch_random": torch.get_rng_state(),
                        "step": step + 1,
                        "order": order,
                        "losses": losses,
                        "tokens": trained_tokens,
                        "wall_seconds": time.perf_counter() - started,
                    }
                )
                last_saved = time.perf_counter()

    wall = time.perf_counter() - started
    peak_rss = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, device=device)
    if launched:  # the largest process's peak: what one machine's process needed
        torch.distributed.all_reduce(peak_rss, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.destroy_process_group()
    if rank != 0:
        return {}
    model.eval()
    if settings.method == "lora":
        model = model.merge_and_unload()  # one plain folder that any engine (and vLLM) can load
    if settings.gradient_checkpointing:
        model.config.use_cache = True
    staging = output_dir / ".weights"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for path in staging.iterdir():
        path.replace(output_dir / path.name)
    staging.rmdir()
    summary = {
        "settings": asdict(settings),
        "base_model": str(model_dir),
        "records": len(records),
        "steps": total_steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_seconds": wall,
        "seconds_per_step": wall / total_steps,
        "tokens_per_second": trained_tokens / wall,
        "resumed_at_step": first_step or None,
        "device": str(device),
        "bf16": use_bf16,
        "world_size": world,
        "onednn": onednn,
        # The process's peak so far (Linux reports KiB): an upper bound on what training needed.
        "peak_rss_gib": float(peak_rss),
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "weights": weights_record(output_dir),  # size and sha256 a resume checks (lm/checkpoint.py)
    }
    write_json_atomic(output_dir / SUMMARY, summary)  # last: the sign that the folder is whole
    if resume is not None:
        resume.path.unlink(missing_ok=True)  # the weights are written: nothing left to resume
    return summary


def data_key(records: list[dict[str, Any]], settings: TrainSettings) -> str:
    """What a resume point must match: the same records and the settings that shape the run."""
    shaping = {
        k: v
        for k, v in asdict(settings).items()
        if k not in ("resume_every_s", "launch_timeout_s", "collective_timeout_s", "onednn", "share_prefix")
    }
    # Keyed by what they mean: a LoRA alpha left to its default is twice the rank, and a setting added
    # since resume points were first written, at the value that means what training did before it
    # existed, is left out, so that a training started before it resumes.
    shaping["lora_alpha"] = settings.lora_alpha or 2 * settings.lora_rank
    if shaping["loss_weighting"] == "tokens":
        del shaping["loss_weighting"]
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode())
    for record in records:
        digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class _Resume:
    """A training's resume point: one file, replaced atomically, only valid for the same data and settings."""

    path: Path
    key: str

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False, map_location="cpu")
        return state if state.get("key") == self.key else None  # other data or settings: start afresh

    def save(self, state: dict[str, Any]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save({**state, "key": self.key}, partial)
        partial.replace(self.path)


def _keep_log_lines(path: Path, steps: int) -> None:
    """Cut train_log.jsonl back to its first `steps` lines: the steps a resumed training keeps."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)[:steps]
        path.write_text("".join(lines))
