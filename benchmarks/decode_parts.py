"""The parts of the embedded engine's decoding step, each timed alone on this machine's code path.

Issue 19: on an AVX2-only machine the engine lost to llama.cpp at one stream. A decoding pass is
made of parts whose costs move differently with the instruction set, and the speculative
decoder's worth is a ratio of them: a plain step (one token through the fp32 model), a check (the
fp32 model over the next token and k drafts, one pass), and a draft step (one token through the
low-bit draft model, in 4 or 8 bits). This times each at 1, 4 and 8 rows on a KV cache of
`--context` tokens, and the fp32 products alone (every linear layer at one row, no attention), so a
run under the AVX2 switches shows where that path loses. `--profile` also splits a draft step and a
check pass at one row by operation (torch's profiler, the calling thread's time in each op): the
low-bit products, the LM head, attention, the fp32 products and everything else, so a bound is
read from what each part costs rather than guessed from bytes; and it times the model's fp32
products through each kernel the wheel has (MKL; oneDNN packed for 1 or for 8 rows) at 1, 5 and 8
rows:

    .venv/bin/python benchmarks/decode_parts.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        .venv/bin/python benchmarks/decode_parts.py           # writes decode_parts-avx2.json

Run on an idle machine (two minutes); medians of `--repeats` passes, in milliseconds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import median_seconds, save

import misstep

misstep.offline()

from misstep.lm import EmbeddedEngine, resolve_model
from misstep.lm.fused import FusedLlama
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


# Which part of a pass each ATen op belongs to (any op not named here: "other", the issuing of
# small operations: norms, rotation, the cache's writes, casts, views).
PARTS = {
    "aten::_weight_int4pack_mm_for_cpu": "4-bit products",
    "aten::_weight_int8pack_mm": "8-bit products",
    "mkldnn::_linear_pointwise": "fp32 products",
    "aten::mm": "fp32 products",
    "aten::addmm": "fp32 products",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_attention_math": "attention",
    "aten::bmm": "attention",
}


@torch.inference_mode()
def profile_ms(model, cache: GrowingCache, width: int, repeats: int) -> dict[str, float]:
    """One row's pass of `width` tokens on `cache`, split by part (ms a pass, from the profiler's
    self time of each op on the calling thread; the profiler's own cost lands mostly in "other")."""
    from torch.profiler import ProfilerActivity, profile

    context = cache.get_seq_length()
    inputs = torch.randint(100, 1000, (1, width))
    mask = torch.ones((1, context + width), dtype=torch.long)
    positions = torch.arange(context, context + width)[None]
    model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache)
    cache.crop(-width)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache)
            cache.crop(-width)
    parts: dict[str, float] = {}
    for event in profiler.key_averages():
        part = PARTS.get(event.key, "other")
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1000 / repeats
    return dict(sorted(parts.items(), key=lambda item: -item[1]))


@torch.inference_mode()
def kernel_products_ms(model_dir, rows: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """Every fp32 product of the model at each row count (a check of k drafts is 1 + k rows), through
    each fp32 kernel the wheel has: MKL (`F.linear`, transformers' path) and oneDNN with its weight
    packed for 1 or 8 rows (the engine packs for 8)."""
    from transformers import AutoModelForCausalLM

    fused = FusedLlama.of(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True))
    linears = [m for m in fused.modules() if isinstance(m, torch.nn.Linear)]  # the engine's: QKV and gate-up fused
    kernels = {"mkl": [(m.weight, F.linear) for m in linears]}
    for hint in (1, 8):
        kernels[f"onednn_packed_{hint}"] = [
            (torch.ops.mkldnn._reorder_linear_weight(m.weight, batch_size=hint), onednn) for m in linears
        ]
    out = {}
    for n in rows:
        inputs = {m.in_features: torch.randn(n, m.in_features) for m in linears}
        out[f"rows_{n}"] = {
            name: 1000 * median_seconds(lambda: [f(inputs[w.shape[1]], w) for w, f in pairs], repeats)
            for name, pairs in kernels.items()
        }
    return out


def onednn(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


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
        if args.profile and rows == 1:
            results["profile_1_row"] = {
                "step": profile_ms(model, cache, 1, args.repeats),
                "check_4": profile_ms(model, cache, 5, args.repeats),
            }
            results["profile_1_row"] |= {
                name: profile_ms(draft, cache, 1, args.repeats) for name, draft in drafts.items() if draft is not None
            }
            for name, split in results["profile_1_row"].items():
                print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()), flush=True)
    if args.profile:
        results["products_by_kernel"] = kernel_products_ms(model_dir, [1, 1 + 4, 8], args.repeats)
        for rows, by_kernel in results["products_by_kernel"].items():
            print(f"products, {rows}: " + ", ".join(f"{k} {v:.2f}" for k, v in by_kernel.items()), flush=True)
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
    parser.add_argument("--profile", action="store_true", help="also split each pass at one row by operation")
    parser.add_argument("--name", default="decode_parts", help="results file: benchmarks/results/NAME[-avx2].json")
    args = parser.parse_args()
    results = on_torch_thread(measure, args)
    print(f"products alone, 1 row: {results['products_1_row']:.2f} ms")
    save(args.name, args.model, results)


if __name__ == "__main__":
    main()
