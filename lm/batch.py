"""The embedded engine's decoding batch: its rows' requests and, per row, what the next pass needs.

Every per-row tensor has one row per active request, in the order of `active`: the attention mask
over the KV cache (0 for padding, and for a row's rejected drafts), each row's positions (the last
column is its latest) and its next-token logits. The rows may start from a common cached head of
`shared` positions (the prompt prefix they share), which attention reads once.

A batch lives as long as requests keep joining it, which under DSPy's threads is a whole run: the
cache columns only the departed rows attended to are dropped as they leave, so its length follows
the rows decoding now, not every token the batch ever decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class Batch:
    active: list[Any]  # the requests still decoding, one per row
    logits: torch.Tensor  # [rows, vocabulary]: each row's next-token logits
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cache length]
    positions: torch.Tensor  # [rows, k]: the last column is each row's latest position
    shared: int  # leading cache positions every row shares (0: none)

    def keep(self, rows: list[int], *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Only the `rows` of the batch stay (the cache in place); return `others`, per-row tensors, cut alike."""
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.active = [self.active[row] for row in rows]
        self.mask, self.positions, self.logits = self.mask[index], self.positions[index], self.logits[index]
        self._drop_unattended()
        return tuple(t[index] for t in others)

    def _drop_unattended(self) -> None:
        """Drop the cache columns after the shared head that no remaining row attends to, up to the
        first one some row does: the departed rows' prompts and answers, and the padding that aligned
        them. Positions are per row and a masked-out key weighs nothing, so answers stay the same up
        to rounding (attention then sums over fewer blocks)."""
        attended = self.mask[:, self.shared :].any(dim=0)
        unattended = int(attended.int().argmax()) if bool(attended.any()) else attended.numel()
        if not unattended:
            return
        start, end = self.shared, self.shared + unattended
        for layer in self.cache.layers:  # a fresh tensor: GrowingLayer moves it into a new buffer, freeing the old
            layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, end:]], dim=2)
            layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, end:]], dim=2)
        self.mask = torch.cat([self.mask[:, :start], self.mask[:, end:]], dim=1)

    def join(self, other: Batch, new_cache: Callable[[], DynamicCache]) -> None:
        """`other`'s rows join this batch (continuous batching); the rows' heads no longer line up."""
        self.cache, self.mask = stack_caches([(self.cache, self.mask), (other.cache, other.mask)], new_cache)
        self.shared = 0
        self.logits = torch.cat([self.logits, other.logits])
        self.positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])
        self.active += other.active


def stack_caches(
    parts: list[tuple[DynamicCache, torch.Tensor]], new_cache: Callable[[], DynamicCache], head: int = 0
) -> tuple[DynamicCache, torch.Tensor]:
    """Caches (with their masks) of different lengths as one batch: the first `head` positions
    (the same head in every part) stay in front, the rest is right-aligned, the shorter parts
    getting masked padding in between. Rows keep their own positions, so padding changes nothing."""
    width = max(mask.shape[1] for _, mask in parts)

    def aligned(tensor: torch.Tensor, dim: int) -> torch.Tensor:  # pad `dim` between head and rest
        front, rest = tensor.narrow(dim, 0, head), tensor.narrow(dim, head, tensor.shape[dim] - head)
        shape = list(tensor.shape)
        shape[dim] = width - tensor.shape[dim]
        return torch.cat([front, tensor.new_zeros(shape), rest], dim=dim)

    stacked = new_cache()
    for index in range(len(parts[0][0].layers)):
        keys, values = (
            [aligned(getattr(cache.layers[index], part), 2) for cache, _ in parts] for part in ("keys", "values")
        )
        stacked.update(torch.cat(keys), torch.cat(values), index)
    return stacked, torch.cat([aligned(mask, 1) for _, mask in parts])
