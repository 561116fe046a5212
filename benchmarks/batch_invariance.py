"""Does a row compute the same numbers alone as in a batch? The README's "the same answer alone or
batched, up to rounding" rests on this: the engine's linear layers (oneDNN, weights packed for 8
rows as lm/kernels.py packs them) on one row against the same row among 8, and attention over a
row's 300 keys against the same keys behind 20 masked padding positions (what a batched row of a
shorter prompt attends over). Seconds of work, no timing:

    .venv/bin/python benchmarks/batch_invariance.py   # writes benchmarks/results/batch_invariance.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save  # noqa: E402
from misstep.lm.kernels import OneDNNLinear  # noqa: E402


def compared(alone: torch.Tensor, batched: torch.Tensor) -> dict:
    return {"bit_identical": torch.equal(alone, batched), "max_abs_difference": (alone - batched).abs().max().item()}


def main() -> None:
    torch.manual_seed(0)
    linear = OneDNNLinear(torch.nn.Linear(576, 1536, bias=False))  # SmolLM2-135M's MLP shape
    rows = torch.randn(8, 576)
    query, key, value = torch.randn(1, 9, 1, 64), torch.randn(1, 9, 300, 64), torch.randn(1, 9, 300, 64)
    padding = torch.zeros(1, 9, 20, 64)
    mask = torch.ones(1, 1, 1, 320, dtype=torch.bool)
    mask[..., :20] = False
    with torch.no_grad():
        results = {
            "linear_row_alone_vs_among_8": compared(linear(rows[:1])[0], linear(rows)[0]),
            "attention_alone_vs_behind_20_masked_keys": compared(
                torch.nn.functional.scaled_dot_product_attention(query, key, value),
                torch.nn.functional.scaled_dot_product_attention(
                    query, torch.cat([padding, key], 2), torch.cat([padding, value], 2), attn_mask=mask
                ),
            ),
        }
    print(results)
    save("batch_invariance", "none (random layers of SmolLM2-135M's shapes)", results)


if __name__ == "__main__":
    main()
