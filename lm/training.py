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
import logging
import math
import os
import random
import re
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import AutoModelForCausalLM, AutoTokenizer

from misstep.data.runfiles import write_json_atomic
from misstep.lm.checkpoint import ADAPTER, SUMMARY, TRAIN_LOG, weights_record
from misstep.lm.kernels import train_linears_through_onednn

logger = logging.getLogger(__name__)

LOSS_WEIGHTINGS = ("tokens", "fields")
Row = tuple[list[int], list[int], list[float]]  # a tokenized record: (input ids, labels, loss weights)
Parts = tuple[list[int], list[int], list[float]]  # a record before cutting: (prompt ids, answer ids, answer weights)
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
    # Give every stage (every distinct system prompt: one signature's instructions) the same share
    # of the loss, however many records and answer tokens it has, and divide each batch's loss by
    # a constant rather than by its own weights, so a batch of short stage-3 answers weighs as
    # much as its share says (balanced_rows). False: records count by their tokens.
    stage_balance: bool = False

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


def chat_parts(tokenizer, messages: list[dict[str, str]], weighting: str = "tokens") -> Parts:
    """(prompt ids, answer ids, the answer's loss weights by `weighting` (answer_weights)) of one chat,
    whose final assistant turn is the answer; nothing cut."""
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
    return prompt_ids, answer_ids, weights


def cut_to_length(parts: Parts, max_length: int) -> Row:
    """(input ids, labels, loss weights) of at most `max_length` tokens: labels -100 and weights 0 on
    the prompt. An over-long answer keeps its first half of `max_length`; the prompt is cut from the
    front, so a record that is too long loses its head (a signature's instructions, first fields)."""
    prompt_ids, answer_ids, weights = parts
    keep = max_length // 2  # an over-long answer is cut, keeping room for some prompt
    answer_ids, weights = answer_ids[:keep], weights[:keep]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids, [0.0] * len(prompt_ids) + weights


def tokenize_chat(tokenizer, messages: list[dict[str, str]], max_length: int, weighting: str = "tokens") -> Row:
    """One chat as a training row: `chat_parts` cut to `max_length` by `cut_to_length`."""
    return cut_to_length(chat_parts(tokenizer, messages, weighting), max_length)


def record_parts(tokenizer, record: dict[str, Any], number: int, settings: TrainSettings) -> Parts:
    """One training record's `chat_parts`, the weights scaled by the record's own "weight" (1 where
    it has none), so that one kind of record can count for more than another."""
    weight = record.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(f"training record {number}: 'weight' must be a positive number, not {weight!r}")
    prompt_ids, answer_ids, weights = chat_parts(tokenizer, record["messages"], settings.loss_weighting)
    return prompt_ids, answer_ids, [w * weight for w in weights]


def record_row(tokenizer, record: dict[str, Any], number: int, settings: TrainSettings) -> Row:
    """One training record as a row: `record_parts` cut to `settings.max_length`."""
    return cut_to_length(record_parts(tokenizer, record, number, settings), settings.max_length)


def cut_records(parts: list[Parts], max_length: int) -> dict[str, int]:
    """How many records are longer than `max_length` (so trained on without the head of their
    prompt), and the longest's tokens; a warning where any is cut, since the model is then asked at
    inference what it never saw whole."""
    lengths = [len(prompt_ids) + len(answer_ids) for prompt_ids, answer_ids, _ in parts]
    cut = sum(n > max_length for n in lengths)
    if cut:
        logger.warning(
            "%d of %d training records are longer than max_length=%d tokens (the longest %d): their prompts "
            "are cut from the front",
            cut,
            len(parts),
            max_length,
            max(lengths),
        )
    return {"records_cut": cut, "longest_record_tokens": max(lengths, default=0)}


def stage_of(record: dict[str, Any]) -> str:
    """Which stage a chat record trains: its system prompt (a signature's instructions and fields),
    "" for a record without one."""
    first = record["messages"][0]
    return first["content"] if first["role"] == "system" else ""


def balanced_rows(rows: list[Row], stages: list[str]) -> tuple[list[Row], float]:
    """`rows` with their loss weights scaled so that every stage's rows together weigh the same,
    and the mean weight a row then carries (a batch of n rows divides its loss by n times it, the
    same for every batch, so a stage's share of the loss holds batch by batch in expectation)."""
    totals: Counter[str] = Counter()
    for (_, _, weights), stage in zip(rows, stages, strict=True):
        totals[stage] += sum(weights)
    share = sum(totals.values()) / len(totals)
    scaled = [
        (ids, labels, [w * share / totals[stage] for w in weights])
        for (ids, labels, weights), stage in zip(rows, stages)
    ]
    return scaled, share * len(totals) / len(rows)


class AnswerLoss(torch.nn.Module):
    """The model with `answer_loss` as its forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model, share_prefix: bool = False):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix

    def forward(self, input_ids, attention_mask, labels, weights, normalizer=None) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights}
        if normalizer is not None:
            batch["normalizer"] = normalizer
        return answer_loss(self.model, batch, share_prefix=self.share_prefix)


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
    mean where they are all 1), or summed with them and divided by the batch's "normalizer" where
    it has one (balanced_rows).

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
    normalizer = batch.get("normalizer")
    return (losses * weights).sum() / (weights.sum() if normalizer is None else normalizer)


def _collate(rows: list[Row], pad_id: int, row_weight: float | None = None) -> dict[str, torch.Tensor]:
    """A padded batch; with `row_weight` (balanced_rows), its loss's constant divisor too."""
    width = max(len(ids) for ids, _, _ in rows)
    batch = {  # right padding for training; padded positions carry no loss
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels, _ in rows]),
        "weights": torch.tensor([weights + [0.0] * (width - len(weights)) for _, _, weights in rows]),
    }
    if row_weight is not None:
        batch["normalizer"] = torch.tensor(row_weight * len(rows))
    return batch


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
    place = _placement(settings)
    random.seed(settings.seed)  # the same on every rank: all ranks draw the same global batches
    torch.manual_seed(settings.seed)
    tokenizer, model = _trainable_model(model_dir, settings, place.device)
    loss_of = _loss_module(model, settings, place)
    parts = [record_parts(tokenizer, r, number, settings) for number, r in enumerate(records)]
    rows = [cut_to_length(p, settings.max_length) for p in parts]
    cut = cut_records(parts, settings.max_length)
    row_weight = None
    if settings.stage_balance:
        rows, row_weight = balanced_rows(rows, [stage_of(r) for r in records])
    global_batch = settings.batch_size * place.world  # each rank trains on its slice of every batch
    steps_per_epoch = math.ceil(len(rows) / (global_batch * settings.gradient_accumulation))
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, schedule = _optimizer(trainable, settings, total_steps)

    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / TRAIN_LOG if place.rank == 0 else Path(os.devnull)
    model.train()
    # fp32 products through oneDNN on CPU (twice MKL's speed on this CPU); on GPU nothing changes.
    onednn = settings.onednn and place.device.type == "cpu" and torch.backends.mkldnn.is_available()
    if onednn:
        train_linears_through_onednn(model)
    # Under a launcher every rank holds the same weights and optimizer state (DDP), so rank 0 alone
    # writes the resume point and every rank reads it back.
    resume = _Resume(output_dir / "resume.pt", data_key(records, settings)) if settings.resume_every_s else None
    state = _TrainState(started=time.perf_counter())
    if resume is not None and (saved := resume.load()) is not None:
        state = state.resumed(saved, model, optimizer, schedule)
        if place.rank == 0:
            _keep_log_lines(log_path, state.step)
    last_saved = time.perf_counter()
    with log_path.open("a" if state.step else "w") as log, _progress_bar(show_progress and place.rank == 0) as bar:
        task = bar.add_task("train", total=total_steps, completed=state.step, loss=float("nan"))
        for step in range(state.step, total_steps):
            step_started = time.perf_counter()
            batches = [
                _next_batch(rows, state.order, global_batch, place) for _ in range(settings.gradient_accumulation)
            ]
            loss, tokens = _train_step(
                loss_of, batches, tokenizer.pad_token_id, place, trainable, optimizer, schedule, row_weight
            )
            state.record(step + 1, loss, tokens)
            log.write(_log_line(step + 1, loss, schedule.get_last_lr()[0], tokens, time.perf_counter() - step_started))
            log.flush()
            bar.update(task, advance=1, loss=loss)
            due = time.perf_counter() - last_saved >= (settings.resume_every_s or 0)
            if resume is not None and place.rank == 0 and step + 1 < total_steps and due:
                resume.save(state.saved(model, optimizer, schedule))
                last_saved = time.perf_counter()

    wall = time.perf_counter() - state.started
    peak_rss = _peak_rss_gib(place)
    if place.rank != 0:
        return {}
    _save_weights(model, tokenizer, output_dir, settings)
    summary = {
        "settings": asdict(settings),
        "base_model": str(model_dir),
        "records": len(records),
        **cut,
        "steps": total_steps,
        "first_loss": state.losses[0],
        "last_loss": state.losses[-1],
        "wall_seconds": wall,
        "seconds_per_step": wall / total_steps,
        "tokens_per_second": state.tokens / wall,
        "resumed_at_step": state.resumed_at or None,
        "device": str(place.device),
        "bf16": place.bf16,
        "world_size": place.world,
        "onednn": onednn,
        # The process's peak so far (Linux reports KiB): an upper bound on what training needed.
        "peak_rss_gib": peak_rss,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if place.device.type == "cuda" else None,
        "weights": weights_record(output_dir),  # size and sha256 a resume checks (lm/checkpoint.py)
        "adapter": weights_record(output_dir / ADAPTER) if settings.method == "lora" else None,
    }
    write_json_atomic(output_dir / SUMMARY, summary)  # last: the sign that the folder is whole
    if resume is not None:
        resume.path.unlink(missing_ok=True)  # the weights are written: nothing left to resume
    return summary


# -- the parts of a training, in the order train_chat uses them -------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device and, under a launcher, its rank among `world` processes."""

    device: torch.device
    launched: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_bf16_supported()


def _placement(settings: TrainSettings) -> Placement:
    """This process's device (one GPU per process under a launcher), after joining the launcher's group."""
    launched, rank, world, local_rank = _distributed()
    wanted = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = wanted.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}" if cuda and launched else wanted)
    if launched:
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=settings.collective_timeout_s)
        )
    return Placement(device, launched, rank, world, local_rank)


def _trainable_model(model_dir: Path, settings: TrainSettings, device: torch.device):
    """The tokenizer, and the model in fp32 on `device` with gradient checkpointing and LoRA as set."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).to(device)
    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing is the kind DistributedDataParallel works with.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha or 2 * settings.lora_rank,
            lora_dropout=settings.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if settings.gradient_checkpointing:
            model.enable_input_require_grads()
    return tokenizer, model


def _loss_module(model, settings: TrainSettings, place: Placement) -> torch.nn.Module:
    """The answer tokens' loss as a module (DistributedDataParallel's unit under a launcher)."""
    # Gradient checkpointing turns the key/value cache off, which the shared prefix needs.
    loss_of = AnswerLoss(model, share_prefix=settings.share_prefix and not settings.gradient_checkpointing)
    if not place.launched:
        return loss_of
    cuda = place.device.type == "cuda"
    loss_of = torch.nn.parallel.DistributedDataParallel(loss_of, device_ids=[place.local_rank] if cuda else None)
    # Never freed in this process (main() leaves without tearing down): freeing DDP frees its
    # process group, whose gloo worker thread may still be releasing a finished collective,
    # which needs the GIL, while the thread freeing the group holds the GIL and waits for that
    # worker's lock. One run in ~10 of the torchrun test hung there (seen in gdb; the mechanism
    # pytorch/pytorch#179291 describes, the hang #75097 reports).
    KEPT_UNTIL_EXIT.append(loss_of)
    return loss_of


def _optimizer(trainable: list[torch.nn.Parameter], settings: TrainSettings, total_steps: int):
    """AdamW, and a schedule that warms up linearly, then decays linearly to zero at the last step."""
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, betas=(0.9, settings.adam_beta2), weight_decay=0.0)
    warmup = max(1, int(settings.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup)))
    )
    return optimizer, schedule


@dataclass
class _TrainState:
    """What a training has done so far: what a resume point saves besides the weights and optimizer."""

    started: float  # perf_counter at the start, moved back by the seconds trained before a resume
    step: int = 0
    order: list[int] = field(default_factory=list)  # the rows still to draw, in order (epochs of shuffles)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    resumed_at: int = 0

    def record(self, step: int, loss: float, tokens: int) -> None:
        self.step, self.tokens = step, self.tokens + tokens
        self.losses.append(loss)

    def saved(self, model, optimizer, schedule) -> dict[str, Any]:
        return {
            # What training changes, and only that: with LoRA the adapter (a few MB, so a resume
            # point is small enough to carry between machines), else every weight.
            "model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "python_random": random.getstate(),
            "torch_random": torch.get_rng_state(),
            "step": self.step,
            "order": self.order,
            "losses": self.losses,
            "tokens": self.tokens,
            "wall_seconds": time.perf_counter() - self.started,
        }

    def resumed(self, saved: dict[str, Any], model, optimizer, schedule) -> _TrainState:
        """The state `saved` held, with the model, optimizer, schedule and random generators set back."""
        _load_trained(model, saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        random.setstate(saved["python_random"])
        torch.set_rng_state(saved["torch_random"])
        return _TrainState(
            started=self.started - saved["wall_seconds"],
            step=saved["step"],
            order=saved["order"],
            losses=saved["losses"],
            tokens=saved["tokens"],
            resumed_at=saved["step"],
        )


def _load_trained(model, trained: dict[str, torch.Tensor]) -> None:
    """Set `model`'s trained parameters from a resume point: every one of them must be there (a
    point saved before only trained parameters were kept holds the whole state, buffers too)."""
    outcome = model.load_state_dict(trained, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(outcome.missing_keys))
    if missing or outcome.unexpected_keys:
        unexpected = outcome.unexpected_keys[:3]
        raise ValueError(f"a resume point that does not fit this model: missing {missing[:3]}, unexpected {unexpected}")


def _progress_bar(shown: bool) -> Progress:
    return Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        disable=not shown,
    )


def _next_batch(rows: list[Row], order: list[int], global_batch: int, place: Placement) -> list[Row]:
    """This rank's slice of the next global batch, drawn from `order` (refilled with a new shuffle
    of all rows when it runs short, so epochs follow one another without a gap)."""
    while len(order) < global_batch:
        order += random.sample(range(len(rows)), len(rows))
    mine = order[:global_batch][place.rank :: place.world]
    del order[:global_batch]
    return [rows[i] for i in mine]


def _train_step(
    loss_of: torch.nn.Module,
    batches: list[list[Row]],
    pad_id: int,
    place: Placement,
    trainable: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    row_weight: float | None = None,
) -> tuple[float, int]:
    """One optimizer step on the gradients of `batches` (gradient accumulation); return the step's
    loss (the ranks' mean) and its tokens (all ranks'). `row_weight`: see balanced_rows."""
    step_loss = torch.zeros(2, device=place.device)  # (loss, tokens), summed over ranks for the log
    for rows in batches:
        batch = {k: v.to(place.device) for k, v in _collate(rows, pad_id, row_weight).items()}
        with torch.autocast(place.device.type, dtype=torch.bfloat16, enabled=place.bf16):
            loss = loss_of(**batch) / len(batches)
        loss.backward()
        step_loss += torch.stack([loss.detach().float(), batch["attention_mask"].sum().float()])
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if place.launched:
        torch.distributed.all_reduce(step_loss)
    return step_loss[0].item() / place.world, int(step_loss[1].item())


def _log_line(step: int, loss: float, lr: float, tokens: int, seconds: float) -> str:
    return json.dumps({"step": step, "loss": loss, "lr": lr, "tokens": tokens, "seconds": seconds}) + "\n"


def _peak_rss_gib(place: Placement) -> float:
    """This process's peak memory (Linux reports KiB); under a launcher, the largest process's,
    which is what one machine's process needed. Leaves the launcher's group."""
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, device=place.device)
    if place.launched:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.destroy_process_group()
    return float(peak)


def _save_weights(model, tokenizer, output_dir: Path, settings: TrainSettings) -> None:
    """One plain Hugging Face folder (LoRA merged in) that any engine, vLLM included, can load. A
    LoRA training also keeps its adapter in `output_dir`/adapter: a few MB that make the weights
    again (merge_adapter) where the folder travels without them."""
    model.eval()
    if settings.method == "lora":
        adapter_staging = output_dir / f".{ADAPTER}"
        shutil.rmtree(adapter_staging, ignore_errors=True)
        model.save_pretrained(adapter_staging, safe_serialization=True)
        shutil.rmtree(output_dir / ADAPTER, ignore_errors=True)
        adapter_staging.replace(output_dir / ADAPTER)
        model = model.merge_and_unload()
    if settings.gradient_checkpointing:
        model.config.use_cache = True
    _write_model_folder(model, tokenizer, output_dir)


def merge_adapter(model_dir: Path, output_dir: Path) -> dict[str, dict[str, Any]]:
    """Write `output_dir`'s weights again from the LoRA adapter its training kept there: `model_dir`'s
    weights (the ones it was trained from) with the adapter merged in, as the training saved them.
    Seconds, where training again takes its whole training time. Returns the weights' record."""
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    merged = PeftModel.from_pretrained(model, output_dir / ADAPTER).merge_and_unload()
    merged.eval()
    _write_model_folder(merged, tokenizer, output_dir)
    return weights_record(output_dir)


def _write_model_folder(model, tokenizer, output_dir: Path) -> None:
    """Written beside and moved in, so the folder never holds half of one save."""
    staging = output_dir / ".weights"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for path in staging.iterdir():
        path.replace(output_dir / path.name)
    staging.rmdir()


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
    if not shaping["stage_balance"]:
        del shaping["stage_balance"]
    # Gradient checkpointing recomputes the forward instead of keeping it: what is learned is the
    # same, so a run may turn it on (to fit longer records in memory) and keep its checkpoints.
    shaping["gradient_checkpointing"] = False
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
