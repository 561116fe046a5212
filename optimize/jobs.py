"""The two jobs of a run directory: generate scenarios with the full cycle, and evaluate a model.

Both append each finished record to a JSONL file as it completes, so a killed job
rerun with the same run directory picks up where it stopped; the summary is
recomputed from every record on disk and written atomically at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy

from misstep.data.loaders import LoadReport
from misstep.data.records import Chain
from misstep.data.runfiles import JsonlLog, holds_run_dir, write_json_atomic
from misstep.lm.client import engine_stats
from misstep.metrics.checks import check_scenario, summarize_scenarios
from misstep.metrics.evaluation import evaluate_chain, injected_gsm8k, summarize
from misstep.metrics.plots import plot_evaluation, plot_generation
from misstep.metrics.stats import Rate
from misstep.optimize.demos import attach_demos
from misstep.programs import Judge, SelfCorrectionCycle, SelfCorrector
from misstep.programs.answer_format import AnswerAdapter
from misstep.programs.parallel import map_logged, map_threads
from misstep.signatures import DescribeMistake, error_type_name, get_error_type


@dataclass
class JobSettings:
    """What a job needs besides its data; the CLI fills it from its options."""

    run_dir: Path
    num_threads: int = 8
    demos: dict[str, list[dspy.Example]] = field(default_factory=dict)
    seed: int = 0
    constrained: bool = True  # answers decoded under their format's grammar (programs/answer_format.py)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Rate):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@holds_run_dir(lambda args: args["settings"].run_dir)
def generate(
    chains: list[Chain], error_types: list[str | type[DescribeMistake]], lm: dspy.LM, settings: JobSettings
) -> dict[str, Any]:
    """Run the six-stage cycle over each valid chain (error types in turn); write scenarios.jsonl,
    summary.json and stages.png into the run directory and return the summary. The run directory
    is this process's while it runs (`RunLock`)."""
    signatures = [get_error_type(e) for e in error_types]
    corrector, judge = SelfCorrector(), Judge()  # shared by every error type's cycle
    cycles = {
        error_type_name(s): attach_demos(SelfCorrectionCycle(s, corrector=corrector, judge=judge), settings.demos)
        for s in signatures
    }
    names = list(cycles)
    work = [(chain, names[i % len(names)]) for i, chain in enumerate(c for c in chains if c.is_valid)]

    started = time.perf_counter()
    with JsonlLog(settings.run_dir / "scenarios.jsonl") as log:
        done = {(r["source_id"], r["error_type"]) for r in log.records}
        todo = [(c, e) for c, e in work if (c.source_id, e) not in done]

        def run(item: tuple[Chain, str]):
            chain, error_type = item
            scenario = cycles[error_type](chain)
            if chain.task == "gsm8k":
                scenario.oracle = check_scenario(scenario)
            return scenario

        for _, scenario in map_threads(
            run,
            todo,
            lm=lm,
            adapter=AnswerAdapter(settings.constrained),
            num_threads=settings.num_threads,
            description="generating",
        ):
            log.append(scenario.to_dict())
        summary = summarize_scenarios(log.records)
    summary["wall_seconds_this_run"] = time.perf_counter() - started
    summary["engine"] = engine_stats(lm)
    summary["constrained"] = settings.constrained  # it changes every stage's parse rate
    summary = _jsonable(summary)
    write_json_atomic(settings.run_dir / "summary.json", summary)
    plot_generation(summary, settings.run_dir / "stages.png")
    return summary


@holds_run_dir(lambda args: args["settings"].run_dir)
def evaluate(
    chains: list[Chain], lm: dspy.LM, settings: JobSettings, *, recover: bool = True, recover_limit: int | None = None
) -> dict[str, Any]:
    """Location accuracy and recovery success of the self-corrector on labelled chains; writes
    predictions.jsonl, metrics.json and metrics.png into the run directory and returns the metrics.
    `recover_limit`: recover from the first that many chains with a mistake only (in `chains`' order,
    so the same items each time). The run directory is this process's while it runs (`RunLock`)."""
    corrector = attach_demos(SelfCorrector(), settings.demos)
    mistaken = [c.source_id for c in chains if c.mistake_index is not None]
    recovered = set(mistaken[:recover_limit]) if recover else set()
    started = time.perf_counter()
    records = map_logged(
        lambda c: evaluate_chain(corrector, c, c.source_id in recovered),
        chains,
        settings.run_dir / "predictions.jsonl",
        lambda c: c.source_id,
        key="source_id",
        lm=lm,
        adapter=AnswerAdapter(settings.constrained),
        num_threads=settings.num_threads,
        description="evaluating",
    )
    wanted = {c.source_id for c in chains}
    metrics = summarize([r for r in records if r["source_id"] in wanted])
    metrics = _jsonable(metrics)
    metrics["_run"] = {
        "wall_seconds_this_run": time.perf_counter() - started,
        "engine": engine_stats(lm),
        "constrained": settings.constrained,  # it changes every accuracy
    }
    write_json_atomic(settings.run_dir / "metrics.json", metrics)
    plot_evaluation(metrics, settings.run_dir / "metrics.png")
    return metrics


def labelled_chains(chains: list[Chain], limit: int | None, seed: int, report: LoadReport | None = None) -> list[Chain]:
    """Chains with first-error labels: BIG-Bench Mistake's as they are, GSM8K's from the injector.

    `report` learns which GSM8K solutions could not be labelled and why: the oracle finds a
    mistake in the solution itself, or no step holds arithmetic the injector can read."""
    if not (chains and chains[0].task == "gsm8k"):
        if report is not None:
            report.loaded = len(chains)
        return chains[:limit] if limit else chains
    return injected_gsm8k(chains, limit, seed=seed, report=report)
