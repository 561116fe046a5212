"""Fine-tuning on chat data, with transformers and peft: the loop, top to bottom.

The data is what DSPy's `BootstrapFinetune` produces: `{"messages": [...]}` records
whose last message is the assistant's answer. Only the answer's tokens (and the
end-of-turn token, so the model learns to stop) carry loss; the prompt is context.
SmolLM2 pads with its end-of-turn token, so labels are masked by the attention mask,
never by the pad id.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class TrainSettings:
    """Every knob of a fine-tune, in one place (the CLI fills it from its options)."""

    method: str = "lora"  # "lora" or "full"
    epochs: float = 1.0
    learning_rate: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 1024  # longer examples are cut from the left of the prompt, never the answer
    batch_size: int = 4
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    warmup_fraction: float = 0.1
    seed: int = 0
    device: str | None = None  # None: CUDA where present, else CPU

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', not {self.method!r}")
        for name in ("epochs", "batch_size", "gradient_accumulation", "max_length", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.method == "lora" else 2e-5)


def tokenize_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat: labels are -100 everywhere but the final assistant turn."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training record must end with the assistant's message")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not extend the prompt with the answer")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[:max_length // 2]  # an over-long answer is cut, keeping room for some prompt
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the answer tokens only.

    The vocabulary projection runs on the answer positions alone: answers are a few
    dozen tokens of prompts that run to a thousand, and a 49k-word head over every
    position would cost more than the rest of the step.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def _collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    return {  # right padding for training; padded positions carry no loss
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
    }


def train_chat(model_dir: Path, records: list[dict[str, Any]], output_dir: Path, settings: TrainSettings,
               show_progress: bool = True) -> dict[str, Any]:
    """Fine-tune `model_dir` on chat `records`; write a full Hugging Face folder (LoRA merged in)
    to `output_dir` with `train_log.jsonl` (loss per step) and `train_summary.json`."""
    if not records:
        raise ValueError("no training records: nothing to fine-tune on")
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha,
                                                 lora_dropout=settings.lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        if settings.gradient_checkpointing:
            model.enable_input_require_grads()
    rows = [tokenize_chat(tokenizer, r["messages"], settings.max_length) for r in records]
    steps_per_epoch = math.ceil(len(rows) / (settings.batch_size * settings.gradient_accumulation))
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    warmup = max(1, int(settings.warmup_fraction * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))

    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "train_log.jsonl"
    order: list[int] = []
    model.train()
    started = time.perf_counter()
    trained_tokens = 0
    losses = []
    with log_path.open("w") as log, Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                             TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                                             disable=not show_progress) as progress:
        task = progress.add_task("train", total=total_steps, loss=float("nan"))
        for step in range(total_steps):
            step_started = time.perf_counter()
            step_loss, step_tokens = 0.0, 0
            for _ in range(settings.gradient_accumulation):
                if len(order) < settings.batch_size:
                    order += random.sample(range(len(rows)), len(rows))
                batch = _collate([rows[i] for i in order[:settings.batch_size]], tokenizer.pad_token_id)
                del order[:settings.batch_size]
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = answer_loss(model, batch) / settings.gradient_accumulation
                loss.backward()
                step_loss += loss.item()
                step_tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            trained_tokens += step_tokens
            losses.append(step_loss)
            seconds = time.perf_counter() - step_started
            log.write(json.dumps({"step": step + 1, "loss": step_loss, "lr": schedule.get_last_lr()[0],
                                  "tokens": step_tokens, "seconds": seconds}) + "\n")
            log.flush()
            progress.update(task, advance=1, loss=step_loss)

    wall = time.perf_counter() - started
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
        "settings": asdict(settings), "base_model": str(model_dir), "records": len(records), "steps": total_steps,
        "first_loss": losses[0], "last_loss": losses[-1], "wall_seconds": wall,
        "seconds_per_step": wall / total_steps, "tokens_per_second": trained_tokens / wall,
        "device": str(device), "bf16": use_bf16,
        # The process's peak so far (Linux reports KiB): an upper bound on what training needed.
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
