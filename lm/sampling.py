"""The next token of each row of a batch: greedy at temperature 0, else sampled.

Every row keeps its own temperature, top-k, top-p and random generator, so a seeded request
samples the same text whatever else is in its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Sampled(Protocol):
    """What a row asks of sampling (the engine's requests have these fields)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None


def pick(logits: torch.Tensor, rows: Sequence[Sampled]) -> torch.Tensor:
    """One token a row from `logits` (rows x vocabulary)."""
    picks = logits.argmax(dim=-1)
    for row, asked in enumerate(rows):
        if asked.temperature <= 0:
            continue
        scores = logits[row].float() / asked.temperature
        if asked.top_k:
            cutoff = torch.topk(scores, min(asked.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < cutoff, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if asked.top_p is not None and asked.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > asked.top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        picks[row] = torch.multinomial(probs, 1, generator=asked.generator)[0]
    return picks
