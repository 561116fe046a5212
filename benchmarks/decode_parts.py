"""The parts of the embedded engine's decoding step, each timed alone on this machine's code path.

Issue 19: on an AVX2-only machine the engine lost to llama.cpp at one stream. A decoding pass is
made of parts whose costs move differently with the instruction set, and the speculative
decoder's worth is a ratio of them: a plain step (one token through the fp32 model), a check (the
fp32 model over the next token and k drafts, one pass), and a draft step (one token through the
low-bit draft model, in 4 or 8 bits). This times each at 1, 4 and 8 rows on a KV cache of
`--context` tokens, and the fp32 products alone (every linear layer at one row, no attention), so a
run under the AVX2 switches shows where that path loses:

    .venv/bin/python benchmarks/decode_parts.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        .venv/bin/python benchmarks/decode_parts.py           # writes decode_parts-avx2.json

Run on an idle machine (two minutes); medians of `--repeats` passes, in milliseconds.
"""

from __future__ import annotations

import argparse

import torch
from common import median_seconds, save

import misstep

misstep.offline()

from misstep.lm import EmbeddedEngine, resolve_model
from misstep.lm.kernels import GrowingCache, on_torch_thread


@torch.inference_mode()
def pass_ms(model, cache: GrowingCache, mask: torch.Tensor, rows: int, width: int, repeats: int) -> float:
    """One pass of `width` tokens a row on `cache` (cropped back after each, so every pass sees the
    same context)."""
    context = cache.get_seq_length()
    inputs = torch.randint(100, 1000, (rows, width))
    full_mask = torch.cat([mask, mask.new_ones((rows, width))], dim=1)
    positions = torch.arange(context, context + width)[None].expand(rows, -1)

    def one() -> None:
        model(input_ids=inputs, attention_mask=full_mask, position_ids=positions, past_key_values=cache)
        cache.crop(-width)

    return 1000 * median_seconds(one, repeats)


@torch.inference_mode()
def products_ms(model, repeats: int) -> float:
    """Every fp32 linear layer of `model` at one row, back to back: the step's products alone."""
    linears = [m for m in model.modules() if hasattr(m, "in_features") and not list(m.children())]
    inputs = [torch.randn(1, m.in_features) for m in linears]
    return 1000 * median_seconds(lambda: [m(x) for m, x in zip(linears, inputs)], repeats)


def measure(args) -> dict:
    model_dir = resolve_model(args.model)
    engines = {bits: EmbeddedEngine(model_dir, draft_bits=bits) for bits in (4, 8)}
    model = engines[4].model
    drafts = {f"draft_int{bits}": engine.draft for bits, engine in engines.items()}
    results: dict = {"context": args.context, "products_1_row": products_ms(model, args.repeats)}
    for rows in args.rows:
        cache, mask = GrowingCache(), torch.ones((rows, args.context), dtype=torch.long)
        with torch.inference_mode():
            model(input_ids=torch.randint(100, 1000, (rows, args.context)), attention_mask=mask, past_key_values=cache)
        parts = {"step": pass_ms(model, cache, mask, rows, 1, args.repeats)}
        for k in args.checks:
            parts[f"check_{k}"] = pass_ms(model, cache, mask, rows, 1 + k, args.repeats)
        for name, draft in drafts.items():
            if draft is not None:
                parts[name] = pass_ms(draft, cache, mask, rows, 1, args.repeats)
        results[f"rows_{rows}"] = parts
        print(f"{rows} rows: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)
    for engine in engines.values():
        engine.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--context", type=int, default=400, help="tokens in the KV cache (a story prompt's size)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--checks", type=int, nargs="+", default=[1, 2, 4, 6, 8], help="drafts a check pass checks")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    results = on_torch_thread(measure, args)
    print(f"products alone, 1 row: {results['products_1_row']:.2f} ms")
    save("decode_parts", args.model, results)


if __name__ == "__main__":
    main()
