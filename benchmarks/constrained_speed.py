"""What constrained decoding costs in decoding speed: the six stages' own prompts, with and without
their answer grammars, at concurrency 1 and 8, on the embedded engine and on vLLM (run by hand, on
an idle machine; never a timed test).

    .venv/bin/python benchmarks/constrained_speed.py [--chains 4] [--engines embedded,vllm] [--repeats 3]

Constrained answers are shorter than free ones while their prompts are the same, so tokens per
second over the wall time charges the prompts to fewer tokens; what constraining costs per token is
the rate of decoding alone. The embedded engine gives it from its own clock (its busy time less its
prompts' prefill) with the share of its time spent in the constraint's own code (masks, the drafts'
checks, the matchers' steps); vLLM from its own metrics (`/metrics`: one over the mean time between
a request's tokens). vLLM caches prompts across requests, so its prompts are sent once before the
timed runs (one token each) and every timed run finds them cached, whichever setting runs first.

Each of `--chains` injected GSM8K chains gives one call of each stage (two ground-truth demos a
stage, the inputs the injector makes: the valid chain, its mistake, the invalid chain, the error
step, the valid chain as the recovery), 6 x chains calls in all, sent from 1 or 8 threads through
`dspy.Predict` as the program sends them. Speed is the generated tokens (each answer's completion
tokens, as the engine reports them) over the wall time: constrained answers differ in length from
free ones, so tokens per second, not seconds, is what compares. The goal: at most 10% slower.

`--equal-text` separates the constraint's own cost from the workload's (embedded engine): the
constrained setting then sends a grammar that admits any text instead of the stage's, so both
settings write the same free answers (the run counts the prompts answered alike) and differ only
by the constraint's machinery: a mask every pass, each draft checked against the masked pick.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
import urllib.request
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
from misstep.programs.answer_format import AnswerAdapter, AnswerFormat, constraint_kwargs

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


SERVED_COUNTERS = (
    "vllm:inter_token_latency_seconds_sum",
    "vllm:inter_token_latency_seconds_count",
    "vllm:request_prefill_time_seconds_sum",
    "vllm:prompt_tokens_total",
    "vllm:prompt_tokens_cached_total",
)


def served_counters(server: VllmServer) -> dict[str, float]:
    """The vLLM server's own counters (Prometheus text at /metrics), each summed over its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = dict.fromkeys(SERVED_COUNTERS, 0.0)
    for line in text.splitlines():
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


ANY_TEXT = AnswerFormat(grammar="root ::= [^]*", closing=())


class AnyTextAdapter(AnswerAdapter):
    """Every call constrained by a grammar that admits any text: the free answers, written under the
    constraint's machinery."""

    def _constrained_kwargs(self, lm, lm_kwargs, signature, inputs):
        return {**lm_kwargs, **constraint_kwargs(lm, ANY_TEXT)} if self.constrained else lm_kwargs


def tokens_per_second(
    lm: dspy.LM, calls, adapter: AnswerAdapter, concurrency: int, server: VllmServer | None = None
) -> dict:
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
    served_before = served_counters(server) if server else None
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        parsed = sum(pool.map(call, calls))
    wall = time.perf_counter() - started
    tokens = sum(entry["usage"]["completion_tokens"] for entry in lm.history[before:])
    out = {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "parsed": parsed, "calls": len(calls)}
    out["answers"] = {str(entry["messages"]): entry["outputs"][0] for entry in lm.history[before:]}
    if engine_before is not None:  # the embedded engine says where its time went
        engine = {key: value - engine_before[key] for key, value in engine_stats(lm).items()}
        decoding = engine["busy_seconds"] - engine["prefill_seconds"]
        out |= {
            "engine": engine,
            "decode_tok_s": engine["generated_tokens"] / decoding,
            # the same prompts both ways: their rate says how fast the machine itself ran meanwhile
            "prefill_tok_s": (engine["prompt_tokens"] - engine["reused_prompt_tokens"]) / engine["prefill_seconds"],
            "constraint_share": engine["constraint_seconds"] / engine["busy_seconds"],
        }
    if served_before is not None:  # so does vLLM, per request
        after = served_counters(server)
        served = {key: after[key] - served_before[key] for key in SERVED_COUNTERS}
        latencies = served["vllm:inter_token_latency_seconds_count"]
        out |= {
            "served": served,
            "decode_tok_s": latencies / served["vllm:inter_token_latency_seconds_sum"] if latencies else None,
        }
    return out


def warm_prefix_cache(lm: dspy.LM, calls) -> None:
    """Send every call's prompt once, for one token, so that vLLM's prefix cache holds them all."""
    adapter = AnswerAdapter(False)

    def prompt_once(item):
        predictor, inputs = item
        lm(messages=adapter.format(predictor.signature, predictor.demos, inputs), max_tokens=1)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(prompt_once, calls))


def bench(lm_for, calls, repeats: int, server: VllmServer | None = None, constrained_adapter=AnswerAdapter) -> dict:
    """Each concurrency's two settings alternate within every repeat (free first in even repeats,
    constrained first in odd ones), so that the machine's drift over a run falls on both alike; the
    costs are medians of the repeats' paired costs."""
    out = {"constrained_by": "any text" if constrained_adapter is AnyTextAdapter else "the stages' grammars"}
    for concurrency in (1, 8):
        runs: dict[str, list[dict]] = {"free": [], "constrained": []}
        for r in range(repeats):
            for constrained in (False, True) if r % 2 == 0 else (True, False):
                setting = "constrained" if constrained else "free"
                adapter = constrained_adapter(True) if constrained else AnswerAdapter(False)
                run = tokens_per_second(lm_for(), calls, adapter, concurrency, server)
                runs[setting].append(run)
                print(f"repeat {r + 1}, {setting}@{concurrency}: {_line(run, len(calls))}")
        for setting, measured in runs.items():
            out[f"{setting}@{concurrency}"] = {"tok_s": summarize([m["tok_s"] for m in measured]), "runs": measured}
            if measured[0].get("decode_tok_s"):
                out[f"{setting}@{concurrency}"]["decode_tok_s"] = summarize([m["decode_tok_s"] for m in measured])
            if "constraint_share" in measured[0]:
                out[f"{setting}@{concurrency}"]["constraint_share"] = summarize(
                    [m["constraint_share"] for m in measured]
                )
        pairs = list(zip(runs["free"], runs["constrained"]))
        out[f"same_answers@{concurrency}"] = [
            sum(c["answers"].get(prompt) == text for prompt, text in f["answers"].items()) for f, c in pairs
        ]
        print(f"at {concurrency}: the same answer both ways on {out[f'same_answers@{concurrency}']} of {len(calls)}")
        for run in runs["free"] + runs["constrained"]:
            del run["answers"]
        costs = {"cost": [1 - c["tok_s"] / f["tok_s"] for f, c in pairs]}
        if all(run.get("decode_tok_s") for pair in pairs for run in pair):
            costs["decode_cost"] = [1 - c["decode_tok_s"] / f["decode_tok_s"] for f, c in pairs]
        if all(run.get("prefill_tok_s") for pair in pairs for run in pair):
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
    if run.get("decode_tok_s"):
        line += f", decoding alone {run['decode_tok_s']:.1f} tok/s"
    if "constraint_share" in run:
        line += f", constraint code {run['constraint_share']:.1%}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--engines", default="embedded,vllm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-python", default=sys.executable)
    parser.add_argument(
        "--equal-text", action="store_true", help="constrain by a grammar admitting any text (embedded)"
    )
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    demos = ground_truth_demos(misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl")), k=2)
    pool = [c for c in misstep.load_chains(args.data) if c.is_valid and c.question not in questions_of(demos)]
    calls = stage_calls(pool[: args.chains], demos)
    results = {"chains": args.chains, "calls": len(calls)}
    if "embedded" in args.engines:
        lm = local_lm(model_dir, cache=False, max_batch_size=8)
        try:
            if args.equal_text:
                results["embedded_equal_text"] = bench(
                    lambda: lm, calls, args.repeats, constrained_adapter=AnyTextAdapter
                )
            else:
                results["embedded"] = bench(lambda: lm, calls, args.repeats)
        finally:
            lm.engine.close()
    if "vllm" in args.engines and not args.equal_text:
        with tempfile.TemporaryDirectory(prefix="misstep-speed-vllm-") as logs:
            options = VllmOptions(python=args.vllm_python, watch_interval=0)
            name = f"{model_dir.name}-{fingerprint(model_dir)}"
            server = VllmServer(model_dir, name, Path(logs) / "vllm.log", options).start()
            try:
                warm_prefix_cache(served_lm(server, cache=False), calls)
                results["vllm"] = bench(lambda: served_lm(server, cache=False), calls, args.repeats, server)
            finally:
                server.stop()
    # both settings measured: the keys say which
    save("constrained_speed_equal_text" if args.equal_text else "constrained_speed", args.model, results)


if __name__ == "__main__":
    main()
