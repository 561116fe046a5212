"""What constrained decoding costs in decoding speed: the six stages' own prompts, with and without
their answer grammars, at concurrency 1 and 8, on the embedded engine and on vLLM (run by hand, on
an idle machine; never a timed test).

    .venv/bin/python benchmarks/constrained_speed.py [--chains 4] [--engines embedded,vllm] [--repeats 3]

On the embedded engine it also gives the rate of decoding alone (the engine's busy time less its
prompts' prefill) and the share of the engine's time spent in the constraint's own code (masks,
the drafts' checks, the matchers' steps), which is what constraining costs per token.

Each of `--chains` injected GSM8K chains gives one call of each stage (two ground-truth demos a
stage, the inputs the injector makes: the valid chain, its mistake, the invalid chain, the error
step, the valid chain as the recovery), 6 x chains calls in all, sent from 1 or 8 threads through
`dspy.Predict` as the program sends them. Speed is the generated tokens (each answer's completion
tokens, as the engine reports them) over the wall time: constrained answers differ in length from
free ones, so tokens per second, not seconds, is what compares. The goal: at most 10% slower.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

import dspy

from misstep.data.records import format_steps
from misstep.lm import engine_stats, local_lm, resolve_model
from misstep.lm.client import served_lm
from misstep.lm.models import fingerprint
from misstep.lm.serving import VllmOptions, VllmServer
from misstep.optimize.demos import attach_demos, ground_truth_demos, questions_of
from misstep.programs import SelfCorrectionCycle
from misstep.programs.answer_format import AnswerAdapter

sys.path.insert(0, str(Path(__file__).parent))
from common import save, summarize  # noqa: E402


def stage_calls(chains, demos) -> list[tuple[dspy.Predict, dict]]:
    """(predictor with its demos, inputs): each stage once per chain."""
    cycle = attach_demos(SelfCorrectionCycle("arithmetic_slip"), demos)
    calls = []
    for chain in chains:
        bad = misstep.inject(chain, "arithmetic_slip", seed=0)
        valid, invalid, step = format_steps(chain.steps), format_steps(bad.steps), bad.mistake_index + 1
        question = chain.question
        calls += [
            (cycle.writer.describe, {"question": question, "valid_chain": valid}),
            (
                cycle.writer.corrupt,
                {
                    "question": question,
                    "valid_chain": valid,
                    "mistake_step": step,
                    "mistake_description": f"an arithmetic slip in step {step}",
                },
            ),
            (cycle.corrector.locate, {"question": question, "chain": invalid}),
            (cycle.corrector.recover, {"question": question, "chain": invalid, "first_error_step": step}),
            (
                cycle.judge.judge,
                {"question": question, "invalid_chain": invalid, "recovery": valid, "correct_chain": valid},
            ),
            (
                cycle.judge.curate,
                {
                    "question": question,
                    "correct_chain": valid,
                    "mistake_description": f"an arithmetic slip in step {step}",
                    "invalid_chain": invalid,
                    "first_error_step": step,
                    "recovery": valid,
                    "recovery_succeeded": True,
                },
            ),
        ]
    return calls


def tokens_per_second(lm: dspy.LM, calls, constrained: bool, concurrency: int) -> dict:
    adapter = AnswerAdapter(constrained)
    before = len(lm.history)

    def call(item):
        predictor, inputs = item
        with dspy.context(lm=lm, adapter=adapter):
            try:
                predictor(**inputs)
                return True
            except Exception:  # an answer that does not parse still cost its tokens
                return False

    engine_before = engine_stats(lm)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parsed = sum(pool.map(call, calls))
    wall = time.perf_counter() - started
    tokens = sum(entry["usage"]["completion_tokens"] for entry in lm.history[before:])
    out = {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "parsed": parsed, "calls": len(calls)}
    if engine_before is not None:  # the embedded engine says where its time went
        engine = {key: value - engine_before[key] for key, value in engine_stats(lm).items()}
        decoding = engine["busy_seconds"] - engine["prefill_seconds"]
        out |= {
            "engine": engine,
            # prompts cost the same either way; constrained answers are shorter, so the prompts' share
            # of the wall time grows: the rate of the decoding passes alone compares per token
            "decode_tok_s": engine["generated_tokens"] / decoding,
            # the same prompts both ways: their rate says how fast the machine itself ran meanwhile
            "prefill_tok_s": (engine["prompt_tokens"] - engine["reused_prompt_tokens"]) / engine["prefill_seconds"],
            "constraint_share": engine["constraint_seconds"] / engine["busy_seconds"],
        }
    return out


def bench(lm_for, calls, repeats: int) -> dict:
    """Each concurrency's two settings alternate within every repeat (free first in even repeats,
    constrained first in odd ones), so that the machine's drift over a run falls on both alike; the
    costs are medians of the repeats' paired costs."""
    out = {}
    for concurrency in (1, 8):
        runs: dict[str, list[dict]] = {"free": [], "constrained": []}
        for r in range(repeats):
            for constrained in (False, True) if r % 2 == 0 else (True, False):
                setting = "constrained" if constrained else "free"
                run = tokens_per_second(lm_for(), calls, constrained, concurrency)
                runs[setting].append(run)
                print(f"repeat {r + 1}, {setting}@{concurrency}: {_line(run, len(calls))}")
        for setting, measured in runs.items():
            out[f"{setting}@{concurrency}"] = {"tok_s": summarize([m["tok_s"] for m in measured]), "runs": measured}
            if "decode_tok_s" in measured[0]:
                out[f"{setting}@{concurrency}"]["decode_tok_s"] = summarize([m["decode_tok_s"] for m in measured])
                out[f"{setting}@{concurrency}"]["constraint_share"] = summarize(
                    [m["constraint_share"] for m in measured]
                )
        pairs = list(zip(runs["free"], runs["constrained"]))
        costs = {"cost": [1 - c["tok_s"] / f["tok_s"] for f, c in pairs]}
        if "decode_tok_s" in runs["free"][0]:
            costs["decode_cost"] = [1 - c["decode_tok_s"] / f["decode_tok_s"] for f, c in pairs]
            # decoding's rate over the same prompts' prefill rate: the machine's own drift divided out
            relative = [[run["decode_tok_s"] / run["prefill_tok_s"] for run in pair] for pair in pairs]
            costs["drift_corrected_decode_cost"] = [1 - c / f for f, c in relative]
        for name, values in costs.items():
            out[f"{name}@{concurrency}"] = statistics.median(values)
            out[f"{name}@{concurrency}:repeats"] = values
            each = ", ".join(f"{v:.1%}" for v in values)
            print(f"at {concurrency}: {name} {statistics.median(values):.1%} (repeats: {each})")
    return out


def _line(run: dict, calls: int) -> str:
    line = f"{run['tok_s']:.1f} tok/s, {run['parsed']}/{calls} parsed"
    if "decode_tok_s" in run:
        line += f", decoding alone {run['decode_tok_s']:.1f} tok/s, constraint code {run['constraint_share']:.1%}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--engines", default="embedded,vllm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", default=sys.executable)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    demos = ground_truth_demos(misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl")), k=2)
    pool = [c for c in misstep.load_chains(args.data) if c.is_valid and c.question not in questions_of(demos)]
    calls = stage_calls(pool[: args.chains], demos)
    results = {"chains": args.chains, "calls": len(calls)}
    if "embedded" in args.engines:
        lm = local_lm(model_dir, cache=False, max_batch_size=8)
        try:
            results["embedded"] = bench(lambda: lm, calls, args.repeats)
        finally:
            lm.engine.close()
    if "vllm" in args.engines:
        with tempfile.TemporaryDirectory(prefix="misstep-speed-vllm-") as logs:
            options = VllmOptions(python=args.vllm_python, watch_interval=0)
            name = f"{model_dir.name}-{fingerprint(model_dir)}"
            server = VllmServer(model_dir, name, Path(logs) / "vllm.log", options).start()
            try:
                results["vllm"] = bench(lambda: served_lm(server, cache=False), calls, args.repeats)
            finally:
                server.stop()
    save("constrained_speed", args.model, results)  # both settings measured: the keys say which


if __name__ == "__main__":
    main()
