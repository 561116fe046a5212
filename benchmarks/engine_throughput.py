"""Embedded-engine decode throughput at concurrency 1 and 8 (run by hand; never a timed test).

    .venv/bin/python benchmarks/engine_throughput.py [--model smollm2-135m-instruct] [--repeats 3]

Sends the same prompts through `misstep.local_lm` from 1 or 8 threads, as DSPy does,
128 new tokens each (EOS ignored is not possible through the chat API, so prompts ask
for long answers and tokens are counted as generated). Reports min/median of the
repeats, and writes benchmarks/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import misstep
from misstep.lm import local_lm, resolve_model

PROMPTS = [f"Write a long story about a {animal} who learns to count. Use many sentences."
           for animal in ("cat", "dog", "fox", "owl", "bee", "cow", "ant", "elk")]


def measure(lm, concurrency: int, max_tokens: int) -> dict:
    engine = lm.engine
    before = engine.stats.generated_tokens
    prompts = PROMPTS[:concurrency]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda p: lm(p, max_tokens=max_tokens), prompts))
    seconds = time.perf_counter() - started
    tokens = engine.stats.generated_tokens - before
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    lm = local_lm(resolve_model(args.model), cache=False, max_batch_size=8)
    lm("warm up", max_tokens=8)
    results = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                           "torch": torch.__version__},
               "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "max_tokens": args.max_tokens}
    for concurrency in (1, 8):
        runs = [measure(lm, concurrency, args.max_tokens) for _ in range(args.repeats)]
        rates = [r["tokens_per_second"] for r in runs]
        results[f"concurrency_{concurrency}"] = {"runs": runs, "min": min(rates), "median": statistics.median(rates)}
        print(f"concurrency {concurrency}: {statistics.median(rates):.1f} tok/s median "
              f"(min {min(rates):.1f}, {args.repeats} runs of {len(PROMPTS[:concurrency])} x {args.max_tokens} tokens)")
    out = Path(__file__).parent / "results" / "engine_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
