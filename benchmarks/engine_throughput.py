"""Decode throughput of the engines at concurrency 1 and 8, on the same prompts (run by hand;
never a timed test).

    .venv/bin/python benchmarks/engine_throughput.py [--engines embedded,vllm] [--repeats 3]
        [--vllm-python /path/to/python/with/vllm]

Sends the same prompts through a `dspy.LM` from 1 or 8 threads, as DSPy does: the
embedded engine in-process (`misstep.local_lm`), and vLLM as a local OpenAI-compatible
server (`misstep.lm.serving.VllmServer`, float32, --enforce-eager on CPU, whose start
time is reported too). Prompts ask for long answers; generated tokens are counted by
re-tokenizing the answers with the model's tokenizer, the same way for every engine.
Reports min/median of the repeats and writes benchmarks/results/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoTokenizer

import misstep
from misstep.lm import local_lm, resolve_model
from misstep.lm.client import served_lm
from misstep.lm.models import fingerprint
from misstep.lm.serving import VllmOptions, VllmServer

PROMPTS = [f"Write a long story about a {animal} who learns to count. Use many sentences."
           for animal in ("cat", "dog", "fox", "owl", "bee", "cow", "ant", "elk")]


def measure(lm, tokenizer, concurrency: int, max_tokens: int) -> dict:
    prompts = PROMPTS[:concurrency]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda p: lm(p, max_tokens=max_tokens)[0], prompts))
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def run_engine(name: str, lm, tokenizer, args) -> dict:
    lm("warm up", max_tokens=8)
    result = {}
    for concurrency in (1, 8):
        runs = [measure(lm, tokenizer, concurrency, args.max_tokens) for _ in range(args.repeats)]
        rates = [r["tokens_per_second"] for r in runs]
        result[f"concurrency_{concurrency}"] = {"runs": runs, "min": min(rates), "median": statistics.median(rates)}
        print(f"{name}, concurrency {concurrency}: {statistics.median(rates):.1f} tok/s median "
              f"(min {min(rates):.1f}, {args.repeats} runs of {concurrency} x {args.max_tokens} tokens)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--engines", default="embedded", help="comma-separated: embedded, vllm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python that has vLLM installed")
    parser.add_argument("--vllm-compiled", action="store_true", help="let vLLM compile (no --enforce-eager)")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results = {"machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                           "torch": torch.__version__},
               "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "max_tokens": args.max_tokens}
    for engine in args.engines.split(","):
        if engine == "embedded":
            lm = local_lm(model_dir, cache=False, max_batch_size=8)
            results["embedded"] = run_engine(engine, lm, tokenizer, args)
            lm.engine.close()
        elif engine == "vllm":
            options = VllmOptions(python=args.vllm_python, enforce_eager=not args.vllm_compiled, watch_interval=0)
            log = Path(tempfile.mkdtemp(prefix="misstep-bench-")) / "vllm.log"
            server = VllmServer(model_dir, f"{model_dir.name}-{fingerprint(model_dir)}", log, options).start()
            try:
                print(f"vllm: server up in {server.start_seconds[-1]:.1f} s (log {log})")
                results["vllm"] = run_engine(engine, served_lm(server, cache=False), tokenizer, args)
                results["vllm"]["start_seconds"] = server.start_seconds[-1]
                results["vllm"]["enforce_eager"] = options.enforce_eager
            finally:
                server.stop()
        else:
            parser.error(f"unknown engine {engine!r}")
    out = Path(__file__).parent / "results" / "engine_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
