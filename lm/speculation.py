"""Drafts for speculative decoding, which one forward pass of the model then checks.

Two sources, cheapest first: tokens copied from the request's own text (prompt lookup: the
six stages copy a great deal from their prompts), and where there is nothing to copy, a few
greedy tokens from the low-bit draft model run on the batch's own cache. Drafts are only for
greedy rows: a draft is checked against the greedy pick. `Backoff` stops copying for a while
after passes that kept too few copied tokens to pay for their wider pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class Decoding(Protocol):
    """What a row's drafts depend on (the engine's requests have these fields)."""

    prompt_ids: list[int]
    tokens: list[int]
    max_new_tokens: int
    temperature: float


def room(row: Decoding) -> int:
    """How many drafted tokens a row can still use (the pass's own next token counts too)."""
    return row.max_new_tokens - len(row.tokens) - 1


def lookup(ids: list[int], k: int, ngram: tuple[int, int]) -> list[int]:
    """The `k` tokens that followed the latest earlier occurrence of the last n tokens (n from the
    longest of `ngram` down to the shortest), or none."""
    longest, shortest = ngram
    for n in range(longest, shortest - 1, -1):
        if len(ids) <= n:
            continue
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + k]
    return []


def copied_drafts(
    rows: Sequence[Decoding], k: int, max_batch: int, ngram: tuple[int, int], device: torch.device
) -> torch.Tensor | None:
    """Prompt-lookup drafts of up to `k` tokens, one row per request (cut to the shortest), or None
    when this pass should not speculate: a sampling row, more than `max_batch` rows, or a row
    with nothing to copy."""
    if not k or len(rows) > max_batch or any(r.temperature > 0 for r in rows):
        return None
    drafts = []
    for row in rows:
        left = room(row)
        draft = lookup(row.prompt_ids + row.tokens, min(k, left), ngram) if left > 0 else []
        if not draft:
            return None
        drafts.append(draft)
    width = min(len(d) for d in drafts)
    return torch.tensor([d[:width] for d in drafts], device=device)


def may_draft(draft_model, rows: Sequence[Decoding], max_batch: int) -> bool:
    """Whether the draft model (where there is one) may draft for this batch: narrow enough, every
    row greedy and with room for a drafted token."""
    return draft_model is not None and len(rows) <= max_batch and all(r.temperature <= 0 and room(r) > 0 for r in rows)


def model_drafts(
    draft_model,
    rows: Sequence[Decoding],
    k: int,
    next_tokens: torch.Tensor,
    cache,
    mask: torch.Tensor,
    positions: torch.Tensor,
    **model_kwargs,
) -> torch.Tensor:
    """Up to `k` greedy tokens a row (fewer where a row has less room) from `draft_model`, run on the
    batch's own cache: over the prompt it reads the model's keys and values, and its own for the
    drafted tokens are cropped again before the model checks them."""
    k = min(k, *(room(r) for r in rows))
    tokens, inputs = [], next_tokens[:, None]
    for step in range(1, k + 1):
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        logits = draft_model(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions[:, -1:] + step,
            past_key_values=cache,
            **model_kwargs,
        ).logits
        inputs = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(inputs)
    cache.crop(-k)
    return torch.cat(tokens, dim=1)


@dataclass
class Backoff:
    """After a pass that kept too few copied drafts, copy none for `wait` passes, doubling (up to
    16) while copying keeps failing."""

    span: int = 1
    wait: int = 0

    def may_copy(self) -> bool:
        return self.wait == 0

    def passed(self) -> None:
        self.wait = max(0, self.wait - 1)

    def judge(self, kept: int, enough: int) -> None:
        """A pass with copied drafts kept `kept` tokens, where `enough` pays for its width."""
        self.span, self.wait = (1, 0) if kept >= enough else (min(2 * self.span, 16), self.span)
