"""Decode throughput and time to first token of the engines at concurrency 1, 4 and 8, on the
same prompts (run by hand; never a timed test).

    .venv/bin/python benchmarks/engines.py [--engines embedded,vllm] [--repeats 3]
        [--vllm-python /path/to/python/with/vllm]

Sends the same prompts through a `dspy.LM` from 1, 4 or 8 threads, as DSPy does: the
embedded engine in-process (`misstep.local_lm`), and vLLM as a local OpenAI-compatible
server (`misstep.lm.serving.VllmServer`, float32, --enforce-eager on CPU, whose start
time is reported too). Decode: prompts ask for long answers, generated tokens are
counted by re-tokenizing the answers, the same way for every engine. Time to first
token: the latency of a one-token answer (prefill and one step), the same way for
every engine. Each repeat numbers its prompts afresh, so no engine answers a repeat
from a prefix or response cache.

Two workloads: "story" (free writing, nothing to copy) and "recover" (the program's stage-4
prompts, ChatAdapter-formatted with two ground-truth demos, over injected GSM8K chains:
the answer rewrites steps of the prompt, which is what the loop mostly generates).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from transformers import AutoTokenizer

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import EmbeddedEngine, EngineSettings, local_lm, resolve_model
from misstep.lm.client import served_lm
from misstep.lm.models import fingerprint
from misstep.lm.serving import VllmOptions, VllmServer

sys.path.insert(0, str(Path(__file__).parent))
from common import save, summarize  # noqa: E402

CONCURRENCY = (1, 4, 8)
ANIMALS = ("cat", "dog", "fox", "owl", "bee", "cow", "ant", "elk")


def prompts(n: int, run: int) -> list[str]:
    return [
        f"({run}) Write a long story about a {animal} who learns to count. Use many sentences."
        for animal in ANIMALS[:n]
    ]


@functools.cache
def _recover_material() -> tuple[list, list]:
    """The recover stage's demos and 40 injected GSM8K chains, built once."""
    from misstep.metrics.evaluation import injected_gsm8k
    from misstep.optimize.demos import ground_truth_demos

    demos = ground_truth_demos(misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl")), k=2)
    return demos["recover"], injected_gsm8k(misstep.load_chains(misstep.sample_path("gsm8k/test.jsonl")), 40)


def recover_prompts(n: int, run: int) -> list[list[dict]]:
    """The recover stage's chat messages for `n` injected GSM8K chains (a fresh set each run)."""
    from misstep.data.records import format_steps
    from misstep.programs import SelfCorrector
    from misstep.programs.answer_format import AnswerAdapter

    demos, chains = _recover_material()
    chosen = [chains[(run * n + i) % len(chains)] for i in range(n)]
    signature = SelfCorrector().recover.signature
    return [
        AnswerAdapter().format(
            signature,
            demos,
            {"question": c.question, "chain": format_steps(c.steps), "first_error_step": c.mistake_index + 1},
        )
        for c in chosen
    ]


def requests(workload: str, n: int, run: int) -> list[list[dict]]:
    """The chat messages of `n` requests of a workload ("story" or "recover") for repeat `run`."""
    if workload == "recover":
        return recover_prompts(n, run)
    return [[{"role": "user", "content": p}] for p in prompts(n, run)]


def decode(
    lm, tokenizer, concurrency: int, max_tokens: int, run: int, workload: str = "story"
) -> tuple[float, list[str]]:
    """Generated tokens per second, all requests together (the prompts are built before the clock
    starts), and the answers."""
    messages = requests(workload, concurrency, run)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda m: lm(messages=m, max_tokens=max_tokens)[0], messages))
    seconds = time.perf_counter() - started
    return sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers) / seconds, answers


def first_token(lm, concurrency: int, run: int) -> float:
    """Median seconds until a one-token answer comes back, with `concurrency` requests at once."""

    def timed(prompt: str) -> float:
        started = time.perf_counter()
        lm(prompt, max_tokens=1)
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        return statistics.median(pool.map(timed, prompts(concurrency, 1000 + run)))


def run_engine(name: str, lm, tokenizer, repeats: int, max_tokens: int) -> tuple[dict, dict[str, list[str]]]:
    """The engine's figures, and its answers by workload, concurrency and repeat (all at temperature 0)."""
    lm("warm up", max_tokens=8)
    result, answers = {}, {}
    for concurrency in CONCURRENCY:
        runs = {}
        for workload in ("story", "recover"):
            rates = []
            for run in range(repeats):
                rate, answers[f"{workload} c{concurrency} r{run}"] = decode(
                    lm, tokenizer, concurrency, max_tokens, run, workload
                )
                rates.append(rate)
            runs[workload] = summarize(rates)
        ttft = summarize([first_token(lm, concurrency, run) for run in range(repeats)])
        story, recover = runs["story"], runs["recover"]
        result[f"concurrency_{concurrency}"] = {
            "tokens_per_second": story,
            "ttft_seconds": ttft,
            "recover_tokens_per_second": recover,
        }
        print(
            f"{name}, concurrency {concurrency}: {story['median']:.1f} tok/s median (min {story['min']:.1f}), "
            f"first token {ttft['median'] * 1000:.0f} ms median; recover prompts {recover['median']:.1f} tok/s"
        )
    return result, answers


def same_answers(answers: dict[str, list[str]], reference: dict[str, list[str]]) -> dict:
    """How many answers are the reference's, character for character, and the first that is not
    (over the requests both engines answered)."""
    pairs = [
        (key, i, a, b)
        for key in reference.keys() & answers.keys()
        for i, (a, b) in enumerate(zip(answers[key], reference[key]))
    ]
    differ = [(key, i, a, b) for key, i, a, b in pairs if a != b]
    first = None
    if differ:
        key, i, a, b = differ[0]
        at = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first = {"request": f"{key} #{i}", "character": at, "got": a[at : at + 60], "reference": b[at : at + 60]}
    return {"identical": len(pairs) - len(differ), "of": len(pairs), "first_difference": first}


def run_llamacpp(
    gguf: Path, python: str, tokenizer, repeats: int, max_tokens: int, threads: int = 2, story_only: bool = False
) -> tuple[dict, dict[str, list[str]]]:
    """llama.cpp on a GGUF file, one request at a time, on the same prompt text (llamacpp_worker.py,
    under a Python that has llama-cpp-python). `story_only`: neither the recover prompts nor the
    first-token timings (single_stream.py's rounds need only the story rate)."""

    def text(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    workloads = ("story",) if story_only else ("story", "recover")
    job = {
        "gguf": str(gguf),
        "threads": threads,
        "max_tokens": max_tokens,
        "requests": {
            f"{w} c1 r{run}": [text(m) for m in requests(w, 1, run)] for w in workloads for run in range(repeats)
        },
        "first_token_prompts": []
        if story_only
        else [text(m) for run in range(repeats) for m in requests("story", 1, 1000 + run)],
    }
    folder = Path(tempfile.mkdtemp(prefix="misstep-llamacpp-"))
    (folder / "job.json").write_text(json.dumps(job))
    subprocess.run(
        [
            python,
            str(Path(__file__).parent / "llamacpp_worker.py"),
            str(folder / "job.json"),
            str(folder / "result.json"),
        ],
        check=True,
    )
    out = json.loads((folder / "result.json").read_text())

    def rate(key: str) -> float:
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in out["answers"][key])
        return tokens / sum(out["seconds"][key])

    row = {"tokens_per_second": summarize([rate(f"story c1 r{run}") for run in range(repeats)])}
    summary = f"llama.cpp {gguf.name}: {row['tokens_per_second']['median']:.1f} tok/s"
    if not story_only:
        row["recover_tokens_per_second"] = summarize([rate(f"recover c1 r{run}") for run in range(repeats)])
        row["ttft_seconds"] = summarize(out["first_token_seconds"])
        summary += (
            f", recover {row['recover_tokens_per_second']['median']:.1f}, "
            f"first token {row['ttft_seconds']['median'] * 1e3:.0f} ms"
        )
    print(summary)
    return {"concurrency_1": row, "load_seconds": out["load_seconds"], "gguf": gguf.name, "threads": threads}, out[
        "answers"
    ]


def bench_engines(
    model_dir: Path,
    engines: list[str],
    repeats: int = 3,
    max_tokens: int = 128,
    vllm_python: str = sys.executable,
    vllm_compiled: bool = False,
    llamacpp_python: str | None = None,
    ggufs: dict[str, Path] | None = None,
) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    results: dict = {"max_tokens": max_tokens, "repeats": repeats}
    answers = {}
    for engine in engines:
        base, *overrides = engine.split(":")
        if base in ("embedded", "embedded-plain"):  # plain: transformers' own kernels, no speculation
            plain = base == "embedded-plain"
            chosen = {"max_batch_size": 8} | ({"speculate": 0, "cpu_kernels": False} if plain else {})
            settings = replace(EngineSettings(**chosen), **engine_overrides(overrides))
            lm = local_lm(engine=EmbeddedEngine(model_dir, settings), cache=False)
            try:
                results[engine], answers[engine] = run_engine(engine, lm, tokenizer, repeats, max_tokens)
            finally:
                lm.engine.close()
        elif engine == "vllm":
            options = VllmOptions(python=vllm_python, enforce_eager=not vllm_compiled, watch_interval=0)
            log = Path(tempfile.mkdtemp(prefix="misstep-bench-")) / "vllm.log"
            server = VllmServer(model_dir, f"{model_dir.name}-{fingerprint(model_dir)}", log, options).start()
            try:
                print(f"vllm: server up in {server.start_seconds[-1]:.1f} s (log {log})")
                results["vllm"], answers["vllm"] = run_engine(
                    engine, served_lm(server, cache=False), tokenizer, repeats, max_tokens
                )
                results["vllm"]["start_seconds"] = server.start_seconds[-1]
                results["vllm"]["enforce_eager"] = options.enforce_eager
            finally:
                server.stop()
        elif engine.startswith("llamacpp-"):  # one per GGUF file: llamacpp-q4_1, llamacpp-f32, ...
            if not llamacpp_python or engine.removeprefix("llamacpp-") not in (ggufs or {}):
                raise ValueError(f"{engine} needs --llamacpp-python and --gguf {engine.removeprefix('llamacpp-')}=PATH")
            results[engine], answers[engine] = run_llamacpp(
                ggufs[engine.removeprefix("llamacpp-")], llamacpp_python, tokenizer, repeats, max_tokens
            )
        else:
            raise ValueError(
                f"unknown engine {engine!r}: embedded, embedded-plain (either with :SETTING=VALUE...), vllm "
                "or llamacpp-NAME"
            )
    if "embedded-plain" in answers:  # transformers' own path is the reference for "same outputs"
        for engine in answers.keys() - {"embedded-plain"}:
            results[engine]["same_answers_as_plain"] = same_answers(answers[engine], answers["embedded-plain"])
            print(f"{engine}: {results[engine]['same_answers_as_plain']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument(
        "--engines",
        default="embedded",
        help="comma-separated: embedded, embedded-plain (transformers' kernels, no speculation), vllm, "
        "llamacpp-NAME; an embedded engine with other settings: embedded:speculate=6:draft_max_batch=8",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--name", default="engines", help="results file: benchmarks/results/NAME[-avx2].json")
    parser.add_argument("--vllm-python", default=sys.executable, help="a Python that has vLLM installed")
    parser.add_argument("--vllm-compiled", action="store_true", help="let vLLM compile (no --enforce-eager)")
    parser.add_argument("--llamacpp-python", default=None, help="a Python that has llama-cpp-python")
    parser.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a GGUF file for engine llamacpp-NAME (repeatable)",
    )
    args = parser.parse_args()
    ggufs = dict(parse_gguf(g) for g in args.gguf)
    save(
        args.name,
        args.model,
        bench_engines(
            resolve_model(args.model),
            args.engines.split(","),
            args.repeats,
            args.max_tokens,
            args.vllm_python,
            args.vllm_compiled,
            args.llamacpp_python,
            ggufs,
        ),
        constrained=False,  # raw prompts, no adapter: every engine decodes the model's own text
    )


def engine_overrides(pairs: list[str]) -> dict:
    """EngineSettings fields from "name=value" strings (`embedded:speculate=6:draft_max_batch=8`), each
    value read as the field's default is typed: an integer, a float, or a boolean (true/false)."""
    fields = {f.name: f for f in dataclasses.fields(EngineSettings)}
    chosen = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields or not value:
            raise ValueError(f"{pair!r}: not SETTING=VALUE for an EngineSettings field ({', '.join(fields)})")
        default = getattr(EngineSettings(), name)
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(f"{pair!r}: {name} is true or false")
            chosen[name] = value.lower() == "true"
        elif isinstance(default, int | float):
            chosen[name] = type(default)(value)
        else:
            raise ValueError(f"{pair!r}: {name} is not a number or a boolean, so not set here")
    return chosen


def parse_gguf(option: str) -> tuple[str, Path]:
    name, _, path = option.partition("=")
    if not path or not Path(path).is_file():
        raise SystemExit(f"--gguf {option!r}: expected NAME=PATH of an existing GGUF file")
    return name, Path(path)


if __name__ == "__main__":
    main()
