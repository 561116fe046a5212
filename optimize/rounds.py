"""The self-improvement loop: each round the current model writes scenarios, the frozen judge
scores them, Optuna-tuned thresholds decide what is kept, BootstrapFinetune compiles the
student on everything kept so far, and the new model is measured on held-out sets.

    history = run_loop(train_chains, heldout, provider=provider, judge_lm=judge_lm,
                       settings=LoopSettings(rounds=3), run_dir=Path("runs/loop"))

Every step of a round leaves a file behind; a rerun skips the steps whose file exists,
so a killed run continues from the last finished step (and, inside the generating and
evaluating steps, from the last finished record).

RUN_DIR/
  loop.json                      settings, and the seed chains kept out (held-out questions)
  optuna.db                      the threshold studies (optuna-dashboard sqlite:///optuna.db)
  round-0/                       the starting model: heldout/, program.json (after a warm-up)
  round-N/selection.json         which seed chains and error types, and why
          scenarios.jsonl        every stage's output, the judge's and curator's verdicts, the oracle's
          tuning.json            the thresholds Optuna chose and the trial values behind them
          kept.jsonl             the kept scenarios, each with why
          program.json, compile_report.json, metric_decisions.jsonl    the compile (weights under checkpoints/)
          heldout/<set>/         predictions and metrics on the held-out sets
          round.json             this round's row of the history, the stop rule's verdict, and the
                                 seconds each step took in the process that ran it
  best.json                      the best round and its weights
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dspy

from misstep.data.records import Chain, Scenario, format_steps
from misstep.data.runfiles import JsonlLog, holds_run_dir, read_records, write_json_atomic, write_jsonl_atomic
from misstep.data.splits import without_heldout
from misstep.lm.client import release
from misstep.lm.provider import LocalProvider
from misstep.metrics.checks import check_scenario
from misstep.metrics.health import StopRule, diversity, judge_health
from misstep.metrics.judge_metric import Thresholds, verdicts
from misstep.metrics.stats import Rate, agreement, rate
from misstep.optimize.compile import CompileResult, compile_program, compiled_or_resumed, warm_up
from misstep.optimize.demos import (
    attach_demos,
    ground_truth_demos,
    questions_of,
    stage_name,
    writer_chat_data,
    writer_ground_truth,
)
from misstep.optimize.jobs import JobSettings, evaluate
from misstep.optimize.tuning import tune_thresholds
from misstep.programs import Judge, SelfCorrectionCycle, SelfCorrector
from misstep.programs.parallel import default_adapter, map_threads
from misstep.signatures import DEFAULT_ERROR_TYPES, get_error_type


@dataclass
class LoopSettings:
    """Every knob of the loop, in one place (the CLI fills it from its options)."""

    rounds: int = 3
    seed_chains: int = 32  # valid chains the model writes scenarios from, each round
    error_types: list[str] = field(default_factory=lambda: list(DEFAULT_ERROR_TYPES))
    ground_truth: int = 16  # worked examples per stage in every compile (no model wrote them)
    warm_up: bool = True  # round 0 fine-tunes on the ground truth alone, so the model's answers parse
    judge_warm_up: bool = True  # the judge gets its own weights, fine-tuned on ground-truth judgements alone
    demos: int = 2  # per stage, for the judge (and the student when there is no warm-up)
    active_selection: bool = True
    exploration: float = 0.3  # share of each round's seeds and error-type weight chosen at random
    tuning_trials: int = 60
    min_yield: float = 0.05
    stop: StopRule = field(default_factory=StopRule)
    primary_metric: str = "location_accuracy"  # of the GSM8K held-out set: what the stop rule watches
    num_threads: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name, least in (
            ("rounds", 1),
            ("seed_chains", 1),
            ("tuning_trials", 1),
            ("num_threads", 1),
            ("ground_truth", 0),
            ("demos", 0),
        ):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least}, not {getattr(self, name)}")
        if not self.error_types:
            raise ValueError("error_types names no error type")
        for name in self.error_types:
            try:
                get_error_type(name)
            except KeyError as exc:  # a setting, not a lookup: say so as a bad value, naming the registered ones
                raise ValueError(exc.args[0]) from None


def _round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round-{r}"


# -- the loop, top to bottom -------------------------------------------------------------------


@holds_run_dir(lambda args: args["run_dir"])
def run_loop(
    train_chains: list[Chain],
    heldout: dict[str, list[Chain]],
    *,
    provider: LocalProvider,
    judge_lm: dspy.LM,
    settings: LoopSettings,
    run_dir: Path,
    validation: dict[str, list[Chain]] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the loop; return the history, one row per round (round 0 = the start).

    `heldout` holds the sets reported (the test splits); `validation` the disjoint sets the stop
    rule and the best round are chosen on, so that the reported figures were never used to
    choose. Without `validation` the choice falls back to `heldout`, and round.json says so. The run
    directory is this process's while it runs (`RunLock`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # No held-out question (test or validation) reaches a demo, the ground truth or a seed.
    pool = without_heldout(
        [c for c in train_chains if c.is_valid],
        [c for sets in (heldout, validation or {}) for chains in sets.values() for c in chains],
    )
    demos = ground_truth_demos(pool, k=settings.demos, seed=settings.seed) if settings.demos else {}
    used = questions_of(demos)
    truth = (
        ground_truth_demos([c for c in pool if c.question not in used], k=settings.ground_truth, seed=settings.seed + 1)
        if settings.ground_truth
        else {}
    )
    used |= questions_of(truth)
    # The writer (stages 1-2) shares the student's weights; it is trained on injected mistakes of
    # each error type, in the warm-up and in every compile, so the chains it writes stay checkable.
    writer_truth = (
        writer_ground_truth(
            [c for c in pool if c.question not in used],
            settings.error_types,
            k=settings.ground_truth,
            seed=settings.seed + 2,
        )
        if settings.ground_truth
        else {}
    )
    for examples in writer_truth.values():
        used |= questions_of(examples)
    writer_records = writer_chat_data(writer_truth, default_adapter())
    trained_types = {t for t, examples in writer_truth.items() if examples["describe"]}
    pool = [c for c in pool if c.question not in used]
    write_json_atomic(
        run_dir / "loop.json",
        {
            "settings": _settings_dict(settings),
            "pool": len(pool),
            "heldout": {k: len(v) for k, v in heldout.items()},
            "writer_ground_truth": {t: len(e["describe"]) for t, e in writer_truth.items()},
        },
    )
    # The frozen judge: compiling the student never trains it. The 135M base model cannot
    # answer in the judge's fields, so by default the judge is the base model fine-tuned once
    # on ground-truth judgements (it never sees the student's output in training).
    seconds: dict[str, float] = {}  # round 0's steps
    if settings.judge_warm_up:
        judge_dir = run_dir / "judge"
        with _timed(seconds, "judge_warm_up"):
            judge, _ = compiled_or_resumed(
                judge_dir,
                lambda: warm_up(
                    Judge(), truth, lm=judge_lm.copy(provider=provider), provider=provider, run_dir=judge_dir
                ),
                provider=provider,
                program=Judge(),
            )
    else:
        judge = attach_demos(Judge(), demos)
        judge.set_lm(judge_lm)

    # Round 0: the model the loop starts from.
    start = _round_dir(run_dir, 0)
    if settings.warm_up:

        def warm_up_student() -> CompileResult:
            base = provider.lm()  # loaded only when round 0 is trained, not when it is resumed
            try:
                return warm_up(
                    SelfCorrector(), truth, lm=base, provider=provider, run_dir=start, extra_records=writer_records
                )
            finally:
                release(base)

        with _timed(seconds, "warm_up"):
            student, _ = compiled_or_resumed(start, warm_up_student, provider=provider)
    else:
        student = attach_demos(SelfCorrector(), demos)
        student.set_lm(provider.lm())
    measured = {"heldout": heldout, "validation": validation or {}}
    history = [_finish_round(0, start, student, measured, None, [], settings, history=[], seconds=seconds)]

    chains = {c.source_id: c for c in pool}
    kept_so_far: dict[str, list[dspy.Example]] = {}
    for r in range(1, settings.rounds + 1):
        folder = _round_dir(run_dir, r)
        seconds = {}
        previous = read_records(_round_dir(run_dir, r - 1) / "scenarios.jsonl")
        selection = _step(
            folder / "selection.json",
            lambda: select_seeds(pool, previous, settings, random.Random(settings.seed * 1009 + r), round_index=r),
        )
        work = [(chains[s], e) for s, e in selection["seeds"]]
        with _timed(seconds, "scenarios"):
            # The writer's weights know its format once a warm-up or a compile has trained them on it.
            trained = trained_types if settings.warm_up or r > 1 else set()
            scenarios = write_scenarios(work, student, judge, demos, folder, settings, trained_writers=trained)
        with _timed(seconds, "tuning"):
            tuning = _step(folder / "tuning.json", lambda: _tune(scenarios, run_dir, r, history, settings))
        thresholds = Thresholds(**tuning["thresholds"])
        kept = _step_jsonl(folder / "kept.jsonl", lambda: keep(scenarios, thresholds))
        examples = [scenario_example(k) for k in kept]
        extra = _merge(truth, kept_so_far)  # accumulate: every earlier round's kept traces, and the ground truth
        previous = student.predictors()[0].lm
        with _timed(seconds, "compile"):
            student, _ = compiled_or_resumed(
                folder,
                lambda: compile_program(
                    student,
                    examples,
                    lm=student.predictors()[0].lm,
                    metric=ReproducesKept(),
                    provider=provider,
                    run_dir=folder,
                    extra_examples=extra,
                    extra_records=writer_records,
                    num_threads=settings.num_threads,
                ),
                provider=provider,
                max_batch_size=settings.num_threads,
            )
        release(previous)  # the round's model is done with: one student in memory at a time
        for stage, stage_examples in stage_examples_of(kept).items():
            kept_so_far.setdefault(stage, []).extend(stage_examples)
        history.append(
            _finish_round(
                r, folder, student, measured, scenarios, kept, settings, history, thresholds=tuning, seconds=seconds
            )
        )
        if history[-1]["verdict"]["stop"]:
            break

    best = history[-1]["verdict"]["best_round"]
    write_json_atomic(
        run_dir / "best.json",
        {"round": best, "program": str(_round_dir(run_dir, best) / "program.json"), "verdict": history[-1]["verdict"]},
    )
    return history


# -- the steps ---------------------------------------------------------------------------------


def select_seeds(
    pool: list[Chain], previous: list[dict[str, Any]], settings: LoopSettings, rng: random.Random, round_index: int
) -> dict[str, Any]:
    """Which valid chains and error types this round writes scenarios from, and why.

    Active selection weighs each error type by how often the current model failed on it
    last round (the oracle's verdict on location and recovery), with `exploration` of the
    weight spread evenly, and re-uses a share of last round's failed chains (under another
    error type) beside fresh ones. Off, it draws chains and error types uniformly."""
    types = list(settings.error_types)
    failed_by_type = {t: [] for t in types}
    for record in previous:
        oracle = record.get("oracle") or {}
        if record["error_type"] in failed_by_type:
            failed_by_type[record["error_type"]].append(not (oracle.get("location_ok") and oracle.get("recovery_ok")))
    n = settings.seed_chains
    if settings.active_selection and previous:
        failure = {t: (sum(f) / len(f) if f else 1.0) for t, f in failed_by_type.items()}
        total = sum(failure.values()) or 1.0
        weights = {
            t: settings.exploration / len(types) + (1 - settings.exploration) * failure[t] / total for t in types
        }
        failed_chains = sorted(
            {
                r["source_id"]
                for r in previous
                if not ((r.get("oracle") or {}).get("location_ok") and (r.get("oracle") or {}).get("recovery_ok"))
            }
        )
        revisit = rng.sample(failed_chains, min(len(failed_chains), int(n * (1 - settings.exploration) / 2)))
        reason = (
            f"error types weighted by last round's failure rate {_rounded(failure)} "
            f"({settings.exploration:.0%} spread evenly); {len(revisit)} of last round's failed chains "
            f"revisited under another error type"
        )
    else:
        weights = {t: 1 / len(types) for t in types}
        revisit = []
        reason = "uniform: first round" if not previous else "uniform: active selection is off"
    seen = {r["source_id"] for r in previous}
    fresh_pool = [c.source_id for c in pool if c.source_id not in seen and c.source_id not in revisit]
    fresh = rng.sample(fresh_pool, min(len(fresh_pool), n - len(revisit)))
    last_type = {r["source_id"]: r["error_type"] for r in previous}
    seeds = []
    for source_id in revisit + fresh:
        candidates = [t for t in types if t != last_type.get(source_id)] or types
        seeds.append((source_id, rng.choices(candidates, weights=[weights[t] for t in candidates])[0]))
    return {
        "round": round_index,
        "seeds": seeds,
        "weights": weights,
        "revisited": len(revisit),
        "mix": dict(Counter(t for _, t in seeds)),
        "reason": reason,
    }


def write_scenarios(
    work: list[tuple[Chain, str]],
    student: SelfCorrector,
    judge: Judge,
    demos: dict[str, list[dspy.Example]],
    folder: Path,
    settings: LoopSettings,
    trained_writers: set[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Stages 1-4 on the current student, 5-6 on the frozen judge, the oracle beside them.

    The writer (stages 1-2) runs on the student's weights: without demos for the error types
    those weights were trained to write (`trained_writers`), with demos for the others."""
    lm = student.predictors()[0].lm
    cycles = {}
    for name in {e for _, e in work}:
        cycle = SelfCorrectionCycle(get_error_type(name), corrector=student, judge=judge)
        attach_demos(cycle.writer, {} if name in trained_writers else demos).set_lm(lm)
        cycles[name] = cycle
    with JsonlLog(folder / "scenarios.jsonl") as log:
        done = {r["source_id"] for r in log.records}
        todo = [(c, e) for c, e in work if c.source_id not in done]

        def run(item: tuple[Chain, str]) -> Scenario:
            chain, error_type = item
            scenario = cycles[error_type](chain)
            scenario.oracle = check_scenario(scenario)
            return scenario

        for _, scenario in map_threads(
            run, todo, lm=lm, num_threads=settings.num_threads, description=f"round {folder.name}: writing scenarios"
        ):
            log.append(scenario.to_dict())
        return list(log.records)


def decision(record: dict[str, Any]) -> dict[str, Any]:
    """The judge's and curator's verdicts on one scenario, beside the oracle's."""
    stages, oracle = record["stages"], record.get("oracle") or {}
    parsed = {name: result["outputs"] if result.get("ok") else None for name, result in stages.items()}
    out: dict[str, Any] = {
        "source_id": record["source_id"],
        "error_type": record["error_type"],
        **verdicts(parsed.get("judge"), parsed.get("curate")),
    }
    if "recovery_ok" in oracle:
        out["oracle_recovery_ok"] = bool(oracle["recovery_ok"])
    if "location_ok" in oracle:
        out["oracle_location_ok"] = bool(oracle["location_ok"])
    return out


def _tune(
    scenarios: list[dict[str, Any]], run_dir: Path, r: int, history: list[dict[str, Any]], settings: LoopSettings
) -> dict[str, Any]:
    decisions = [decision(s) for s in scenarios]
    judged = [d for d in decisions if "verdict" in d and "keep" in d and "oracle_recovery_ok" in d]
    if not judged:
        return {
            "thresholds": asdict(Thresholds()),
            "reason": "nothing judged with an oracle verdict: defaults",
            "judged": 0,
        }
    # Tune on a validation slice (every other judged trace), report precision on the rest.
    validation, rest = judged[::2], judged[1::2]
    earlier = [
        Thresholds(**row["thresholds"]["thresholds"])
        for row in history
        if row.get("thresholds") and "trial" in row["thresholds"]
    ]
    result = tune_thresholds(
        validation,
        run_dir / "optuna.db",
        r,
        trials=settings.tuning_trials,
        min_yield=settings.min_yield,
        warm_start=earlier,
        seed=settings.seed,
    )
    chosen = result.thresholds
    held = [d for d in rest if chosen.admit(d)]
    return {
        **result.to_dict(),
        "validation": len(validation),
        "precision_on_rest": rate(d["oracle_recovery_ok"] for d in held).to_dict(),
    }


def keep(scenarios: list[dict[str, Any]], thresholds: Thresholds) -> list[dict[str, Any]]:
    """The scenarios the thresholds admit, each with the verdicts that admitted it."""
    kept = []
    for record in scenarios:
        why = decision(record)
        if "verdict" in why and "keep" in why and thresholds.admit(why):
            kept.append({**record, "kept_because": {**why, "thresholds": asdict(thresholds)}})
    return kept


def stage_examples_of(kept: list[dict[str, Any]]) -> dict[str, list[dspy.Example]]:
    """The kept scenarios' stage 3 and 4 calls as worked examples, for the next rounds' training."""
    out: dict[str, list[dspy.Example]] = {"locate": [], "recover": []}
    for record in kept:
        question, chain = record["chain"]["question"], format_steps(record["invalid_steps"])
        located = record["stages"]["locate"]["outputs"]
        recovered = record["stages"]["recover"]["outputs"]
        out["locate"].append(dspy.Example(question=question, chain=chain, **located))
        out["recover"].append(
            dspy.Example(question=question, chain=chain, first_error_step=located["first_error_step"], **recovered)
        )
    return out


def scenario_example(record: dict[str, Any]) -> dspy.Example:
    """A kept scenario as a BootstrapFinetune example: the model-written chain is the input, and
    what the judge accepted is what the re-run trace must reproduce."""
    return dspy.Example(
        question=record["chain"]["question"],
        steps=tuple(record["invalid_steps"]),
        kept_first_error=record["oracle"].get("located"),
        kept_final_answer=record["stages"]["recover"]["outputs"]["final_answer"],
        source_id=record["source_id"],
    ).with_inputs("question", "steps")


class ReproducesKept:
    """The round's metric: keep a re-run trace only if it is the trace the judge accepted.

    BootstrapFinetune re-runs the student on each kept scenario's chain; at temperature 0
    with DSPy's cache that is the same answer, and anything else was never judged."""

    def __init__(self):
        self.decisions: list[dict[str, Any]] = []

    def __call__(self, example: dspy.Example, prediction: dspy.Prediction, trace=None) -> bool:
        same = prediction.get("first_error") == example.kept_first_error and str(prediction.get("final_answer")) == str(
            example.kept_final_answer
        )
        self.decisions.append({"source_id": example.source_id, "kept": same})
        return same

    def report(self) -> dict[str, Any]:
        return {
            "metric": "reproduces_kept",
            "judged": len(self.decisions),
            "kept": sum(d["kept"] for d in self.decisions),
        }


def _finish_round(
    r: int,
    folder: Path,
    student: SelfCorrector,
    measured: dict[str, dict[str, list[Chain]]],
    scenarios: list[dict[str, Any]] | None,
    kept: list[dict[str, Any]],
    settings: LoopSettings,
    history: list[dict[str, Any]],
    thresholds: dict[str, Any] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Measure the round's model on the held-out sets (`measured`: "heldout", the reported test sets,
    and "validation", the sets choices are made on) and write round.json with the stop rule's
    verdict and the seconds each step took here (a step resumed from its file takes ~0)."""
    if (folder / "round.json").exists():
        return json.loads((folder / "round.json").read_text())
    seconds = dict(seconds or {})
    lm = student.predictors()[0].lm
    demos = {stage_name(name): list(p.demos) for name, p in student.named_predictors() if p.demos}
    row: dict[str, Any] = {"round": r, "model": lm.model}
    with _timed(seconds, "heldout"):
        for kind, sets in measured.items():
            row[kind] = {}
            for name, chains in sets.items():
                where = folder / kind / name if kind == "validation" else folder / "heldout" / name
                job = JobSettings(run_dir=where, num_threads=settings.num_threads, demos=demos)
                result = evaluate(chains, lm, job, recover=kind == "heldout" and chains[0].task == "gsm8k")
                row[kind][name] = {
                    task: {k: v for k, v in m.items() if k in _ROUND_METRICS}
                    for task, m in result.items()
                    if not task.startswith("_")
                }
    row["chosen_on"] = "validation" if measured.get("validation") else "heldout"
    if scenarios is not None:
        decisions = [decision(s) for s in scenarios]
        judged = [d for d in decisions if "verdict" in d and "oracle_recovery_ok" in d]
        row["judge"] = {
            k: v.to_dict()
            for k, v in agreement([d["verdict"] for d in judged], [d["oracle_recovery_ok"] for d in judged]).items()
        }
        row["scenarios"] = len(scenarios)
        row["kept"] = len(kept)
        row["acceptance"] = rate([True] * len(kept) + [False] * (len(scenarios) - len(kept))).to_dict()
        row["kept_error_types"] = dict(Counter(k["error_type"] for k in kept))
        row["diversity"] = diversity(["\n".join(k["recovered_steps"]) for k in kept])
        row["thresholds"] = thresholds
    past = [*history, row]
    primary = [_primary(h, settings.primary_metric) for h in past]
    row["answers"] = _answers(row)
    verdict = judge_health(
        primary,
        [h.get("diversity", {}).get("distinct_2") for h in past],
        settings.stop,
        top_share=[(h.get("answers") or {}).get("top_share") for h in past],
    )
    row["verdict"] = asdict(verdict)
    row["seconds"] = {step: round(value, 1) for step, value in seconds.items()}
    write_json_atomic(folder / "round.json", row)
    return row


# What round.json keeps of each held-out set's metrics.
_ROUND_METRICS = ("n", "location_accuracy", "recovery_success", "majority_baseline", "last_step_baseline", "answers")


def _choice_set(row: dict[str, Any]) -> dict[str, Any]:
    """The GSM8K metrics the loop chooses on: the validation split's, else the reported set's."""
    return row[row.get("chosen_on", "heldout")].get("gsm8k", {}).get("gsm8k", {})


def _primary(row: dict[str, Any], metric: str) -> Rate:
    value = _choice_set(row).get(metric) or {"k": 0, "n": 0}
    return Rate(value["k"], value["n"])


def _answers(row: dict[str, Any]) -> dict[str, Any]:
    """The spread of the round's stage-3 answers on the set it is chosen on (a collapse shows here)."""
    return _choice_set(row).get("answers") or {}


# -- small helpers -----------------------------------------------------------------------------


@contextmanager
def _timed(seconds: dict[str, float], step: str):
    """Add the wall time of the block to `seconds[step]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started


def _step(path: Path, make) -> dict[str, Any]:
    """The step's saved output, or make it and save it atomically (so a half-written one is never read)."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    write_json_atomic(path, value)
    return value


def _step_jsonl(path: Path, make) -> list[dict[str, Any]]:
    if path.exists():
        return read_records(path)
    records = make()
    write_jsonl_atomic(path, records)
    return records


def _merge(*sets: dict[str, list[dspy.Example]]) -> dict[str, list[dspy.Example]]:
    merged: dict[str, list[dspy.Example]] = {}
    for examples in sets:
        for stage, items in examples.items():
            merged.setdefault(stage, []).extend(items)
    return merged


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}


def _settings_dict(settings: LoopSettings) -> dict[str, Any]:
    return {**asdict(settings), "stop": asdict(settings.stop)}
