"""Where a round's training examples come from: the two ways a round of `run_loop` is fed.

- `WrittenScenarios` (`misstep optimize`): the current model writes scenarios from chosen seed
  chains (stages 1-4), the frozen judge scores them (5-6) under Optuna-tuned thresholds, and the
  round's arm (`LoopSettings.keep`: judge, oracle, all, random; optimize/arms.py) admits some of
  the student's own locations and recoveries, which it is then trained on.
- `InjectedTraces` (`misstep compile`): no writer; the injector corrupts valid chains (exact
  labels), the student traces them, and the judge (or the oracle) keeps its traces.

A source's `make(round)` returns the round's `RoundExamples`: BootstrapFinetune's trainset and
metric, the stage examples later rounds train on beside the ground truth, and what the round's
row of the history records of how they were made.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import dspy

from misstep.data.records import Chain, Scenario, format_steps
from misstep.data.runfiles import JsonlLog, read_records, saved_or_made, saved_or_made_jsonl, timed
from misstep.metrics.checks import check_scenario
from misstep.metrics.health import diversity
from misstep.metrics.injector import inject_many
from misstep.metrics.judge_metric import JudgeMetric, OracleMetric, Thresholds, verdicts
from misstep.metrics.stats import agreement, rate
from misstep.optimize.arms import Taught, balanced, sources, teach
from misstep.optimize.compile import Metric, NothingToTrainOn, training_examples
from misstep.optimize.demos import attach_demos, demos_of
from misstep.optimize.frontier import heldout_questions, previous_level, procedural_pool
from misstep.optimize.settings import LoopSettings
from misstep.optimize.tuning import tune_thresholds
from misstep.programs import Judge, SelfCorrectionCycle, SelfCorrector
from misstep.programs.answer_format import AnswerAdapter
from misstep.programs.parallel import map_threads
from misstep.signatures import get_error_type


@dataclass
class Round:
    """What a source is given for round `index` (1, 2, ...): where it writes, the models, and the chains."""

    index: int
    folder: Path  # RUN_DIR/round-<index>
    run_dir: Path
    student: SelfCorrector
    judge: Judge  # frozen (no compile trains it), or the student's own weights under self_judge
    demos: dict[str, list[dspy.Example]]  # for stages whose weights have not been trained on their format
    pool: list[Chain]  # valid chains no demo, ground truth or held-out set holds
    history: list[dict[str, Any]]  # the rows of the rounds before
    settings: LoopSettings
    trained_writers: set[str]  # error types whose writer the student's weights were trained on
    seconds: dict[str, float]  # the wall time of each step, into round.json
    # How often each first-error step (0-based; None: no mistake) is the answer in the set rounds are
    # chosen on: no taught location may be more than twice as frequent as there (`arms.balanced`).
    label_counts: dict[int | None, int] = field(default_factory=dict)


@dataclass
class RoundExamples:
    """A round's training data, and what its row of the history says about it: a trainset the
    student traces and `metric` keeps from, and stage examples trained on as they are."""

    trainset: list[dspy.Example]
    metric: Metric | None
    examples: dict[str, list[dspy.Example]] = field(default_factory=dict)  # by stage, this round
    for_later_rounds: dict[str, list[dspy.Example]] = field(default_factory=dict)  # by stage
    row: dict[str, Any] = field(default_factory=dict)


class RoundSource(Protocol):
    writes: bool  # whether the student's weights also learn to write scenarios (stages 1-2)

    def make(self, round: Round) -> RoundExamples: ...


@dataclass
class InjectedTraces:
    """`size` chains corrupted by the injector, traced by the student; `metric` "judge" keeps a trace
    the frozen judge accepts (`thresholds`), "oracle" one that ground truth confirms."""

    size: int
    metric: str = "judge"
    thresholds: Thresholds = field(default_factory=Thresholds)
    writes = False

    def __post_init__(self) -> None:
        if self.metric not in ("judge", "oracle"):
            raise ValueError(f"metric must be 'judge' or 'oracle', not {self.metric!r}")

    def make(self, round: Round) -> RoundExamples:
        pairs = [(good, bad) for good, bad, _ in inject_many(round.pool, seed=round.settings.seed)][: self.size]
        if not pairs:
            raise NothingToTrainOn("no training examples: the injector found no valid chain to corrupt in the data")
        if self.metric == "oracle":
            metric: Metric = OracleMetric()
        else:
            judge_lm = round.judge.predictors()[0].lm
            metric = JudgeMetric(judge_lm, self.thresholds, judge=round.judge, constrained=round.settings.constrained)
        return RoundExamples(training_examples(pairs), metric, row={"traced": len(pairs), "metric": self.metric})


@dataclass
class WrittenScenarios:
    """The model writes the round's scenarios; tuned thresholds on the judge's verdicts keep some."""

    writes = True

    def make(self, round: Round) -> RoundExamples:
        settings, folder, r = round.settings, round.folder, round.index
        earlier = read_records(round.run_dir / f"round-{r - 1}" / "scenarios.jsonl")
        previous = [Scenario.from_dict(x) for x in earlier if not x.get("candidate")]  # one record a chain
        selection = saved_or_made(folder / "selection.json", lambda: _selection(round, previous))
        chains = {s.chain.source_id: s.chain for s in previous} | {c.source_id: c for c in round.pool}
        chains |= {c["source_id"]: Chain.from_dict(c) for c in selection.get("chains", [])}
        work = [(chains[s], e) for s, e in selection["seeds"]]
        with timed(round.seconds, "scenarios"):
            scenarios = write_scenarios(
                work, round.student, round.judge, round.demos, folder, settings, trained_writers=round.trained_writers
            )
        with timed(round.seconds, "tuning"):
            tuning = saved_or_made(
                folder / "tuning.json", lambda: _tune(scenarios, round.run_dir, r, round.history, settings)
            )
        thresholds = Thresholds(**tuning["thresholds"])
        kept = [
            Kept.from_dict(x)
            for x in saved_or_made_jsonl(
                folder / "kept.jsonl",
                lambda: [
                    k.to_dict()
                    for k in keep(scenarios, thresholds, settings.keep, round.label_counts, seed=settings.seed + r)
                ],
            )
        ]
        examples = stage_examples_of(kept)
        # Trained on directly, this round and every later one: the student's own answers the arm admitted.
        return RoundExamples(
            [], None, examples=examples, for_later_rounds=examples, row=scenario_row(scenarios, kept, tuning)
        )


def _selection(round: Round, previous: list[Scenario]) -> dict[str, Any]:
    """The round's seeds and why (selection.json): from the training chains, or from procedural
    problems made for the round (kept in selection.json with how their level was chosen)."""
    settings, r = round.settings, round.index
    seed = settings.seed * 1009 + r
    rng = random.Random(seed)
    if settings.seeds_from == "gsm8k":
        return select_seeds(round.pool, previous, settings, rng, round_index=r)
    pool, how = procedural_pool(
        round.student,
        round.folder,
        previous_level(round.run_dir, r),
        selection=settings.level_selection,
        start_level=settings.start_level,
        n=settings.seed_chains,
        probe_items=settings.probe_items,
        seed=seed,
        num_threads=settings.num_threads,
        constrained=settings.constrained,
        exclude=heldout_questions(),
    )
    selected = select_seeds(pool, previous, settings, rng, round_index=r)
    return {**selected, "procedural": how, "chains": [c.to_dict() for c in pool]}


def scenario_row(scenarios: list[Scenario], kept: list[Kept], tuning: dict[str, Any]) -> dict:
    """What a round's row records of its scenarios: the judge against the oracle, what the arm kept
    (and from which source each label came), and how varied it is."""
    decisions = [decision(s) for s in scenarios]
    judged = [d for d in decisions if "verdict" in d and "oracle_recovery_ok" in d]
    return {
        "judge": {
            k: v.to_dict()
            for k, v in agreement([d["verdict"] for d in judged], [d["oracle_recovery_ok"] for d in judged]).items()
        },
        "scenarios": len(scenarios),
        "writer_failed": sum(bool(s.oracle.get("writer_failed")) for s in scenarios),
        "kept": len(kept),
        "acceptance": rate([True] * len(kept) + [False] * (len(scenarios) - len(kept))).to_dict(),
        "taught": sources([k.taught for k in kept]),
        "kept_error_types": dict(Counter(k.scenario.error_type for k in kept)),
        "diversity": diversity(["\n".join(k.scenario.recovered_steps) for k in kept if k.taught.recovery_by]),
        "thresholds": tuning,
    }


# -- the steps of a written round ---------------------------------------------------------------


def select_seeds(
    pool: list[Chain], previous: list[Scenario], settings: LoopSettings, rng: random.Random, round_index: int
) -> dict[str, Any]:
    """Which valid chains and error types this round writes scenarios from, and why.

    Active selection weighs each error type by how often the current model failed on it
    last round (the oracle's verdict on location and recovery), with `exploration` of the
    weight spread evenly, and re-uses a share of last round's failed chains (under another
    error type) beside fresh ones. Off, it draws chains and error types uniformly."""
    types = list(settings.error_types)
    failed_by_type = {t: [] for t in types}
    for scenario in previous:
        if scenario.error_type in failed_by_type:
            failed_by_type[scenario.error_type].append(not _solved(scenario))
    n = settings.seed_chains
    if settings.active_selection and previous:
        failure = {t: (sum(f) / len(f) if f else 1.0) for t, f in failed_by_type.items()}
        total = sum(failure.values()) or 1.0
        weights = {
            t: settings.exploration / len(types) + (1 - settings.exploration) * failure[t] / total for t in types
        }
        failed_chains = sorted({s.chain.source_id for s in previous if not _solved(s)})
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
    seen = {s.chain.source_id for s in previous}
    fresh_pool = [c.source_id for c in pool if c.source_id not in seen and c.source_id not in revisit]
    fresh = rng.sample(fresh_pool, min(len(fresh_pool), n - len(revisit)))
    last_type = {s.chain.source_id: s.error_type for s in previous}
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


def _solved(scenario: Scenario) -> bool:
    """Whether the oracle says the model found the first error and recovered from it."""
    return bool(scenario.oracle.get("location_ok") and scenario.oracle.get("recovery_ok"))


def write_scenarios(
    work: list[tuple[Chain, str]],
    student: SelfCorrector,
    judge: Judge,
    demos: dict[str, list[dspy.Example]],
    folder: Path,
    settings: LoopSettings,
    trained_writers: set[str] = frozenset(),
) -> list[Scenario]:
    """Stages 1-4 on the current student, 5-6 on the frozen judge, the oracle beside them; then
    `settings.candidates - 1` more candidates per written chain: stages 3-6 again, the student
    sampling at `settings.candidate_temperature` (a seed per candidate), each its own record.

    The writer (stages 1-2) runs on the student's weights: without demos for the error types
    those weights were trained to write (`trained_writers`), with demos for the others."""
    lm = student.predictors()[0].lm
    cycles, samplers = {}, {}
    for name in {e for _, e in work}:
        cycle = SelfCorrectionCycle(get_error_type(name), corrector=student, judge=judge)
        attach_demos(cycle.writer, {} if name in trained_writers else demos).set_lm(lm)
        cycles[name] = cycle
    for c in range(1, settings.candidates):
        sampling = {"temperature": settings.candidate_temperature, "seed": settings.seed * 1000 + c}
        sampler = attach_demos(SelfCorrector(), demos_of(student))
        sampler.set_lm(lm.copy(**sampling))
        samplers[c] = (SelfCorrectionCycle(corrector=sampler, judge=judge), sampling)
    with JsonlLog(folder / "scenarios.jsonl") as log:
        done = {(r["source_id"], r.get("candidate", 0)): r for r in log.records}
        todo = [(c, e) for c, e in work if any((c.source_id, k) not in done for k in range(settings.candidates))]

        def run(item: tuple[Chain, str]) -> list[Scenario]:
            """The chain's records not yet in the log (after a kill: its missing candidates alone)."""
            chain, error_type = item
            out = []
            if (chain.source_id, 0) in done:
                scenario = Scenario.from_dict(done[chain.source_id, 0])
            else:
                scenario = cycles[error_type](chain)
                scenario.oracle = check_scenario(scenario)
                out.append(scenario)
            if scenario.invalid_steps:  # a chain written: its candidates sample stages 3-6 on it
                written = {stage: scenario.stages[stage] for stage in ("describe", "corrupt")}
                for c, (sampler, sampling) in samplers.items():
                    if (chain.source_id, c) not in done:
                        blank = replace(scenario, stages=dict(written), oracle={}, candidate=c, sampling=sampling)
                        candidate = sampler.correct(blank)
                        candidate.oracle = check_scenario(candidate)
                        out.append(candidate)
            return out

        for _, scenarios in map_threads(
            run,
            todo,
            lm=lm,
            adapter=AnswerAdapter(settings.constrained),
            num_threads=settings.num_threads,
            description=f"round {folder.name}: writing scenarios",
        ):
            for scenario in scenarios:
                log.append(scenario.to_dict())
        # In the work's order, not the threads' (the file's): the kept set, its balancing and the
        # random arm's draw are made from this list, and a rerun must make the same.
        place = {chain.source_id: i for i, (chain, _) in enumerate(work)}
        records = sorted(log.records, key=lambda r: (place.get(r["source_id"], len(place)), r.get("candidate", 0)))
        return [Scenario.from_dict(record) for record in records]


def decision(scenario: Scenario) -> dict[str, Any]:
    """The judge's and curator's verdicts on one scenario, beside the oracle's."""
    oracle = scenario.oracle
    parsed = {name: result.outputs if result.ok else None for name, result in scenario.stages.items()}
    out: dict[str, Any] = {
        "source_id": scenario.chain.source_id,
        "candidate": scenario.candidate,
        "error_type": scenario.error_type,
        **verdicts(parsed.get("judge"), parsed.get("curate")),
    }
    if "recovery_ok" in oracle:
        out["oracle_recovery_ok"] = bool(oracle["recovery_ok"])
    if "location_ok" in oracle:
        out["oracle_location_ok"] = bool(oracle["location_ok"])
    return out


def _tune(
    scenarios: list[Scenario], run_dir: Path, r: int, history: list[dict[str, Any]], settings: LoopSettings
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


@dataclass
class Kept:
    """A scenario the round's arm teaches something from, and why (kept.jsonl: the scenario's record
    with `kept_because`: the judge's verdicts, the thresholds, the arm and what it taught)."""

    scenario: Scenario
    because: dict[str, Any]

    @property
    def taught(self) -> Taught:
        return Taught(**self.because["taught"])

    def to_dict(self) -> dict[str, Any]:
        return {**self.scenario.to_dict(), "kept_because": self.because}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Kept:
        return cls(Scenario.from_dict(record), record["kept_because"])


def keep(
    scenarios: list[Scenario],
    thresholds: Thresholds,
    arm: str,
    label_counts: Mapping[int | None, int],
    seed: int = 0,
) -> list[Kept]:
    """The scenarios `arm` teaches from (optimize/arms.py), the judge's verdicts admitted by
    `thresholds` where the arm asks the judge; the taught locations balanced against
    `label_counts` (none when it is empty)."""
    verdicts_of = {s.key: decision(s) for s in scenarios}
    accepted = {key: "verdict" in why and "keep" in why and thresholds.admit(why) for key, why in verdicts_of.items()}
    taught = teach(arm, scenarios, accepted, seed=seed)
    if label_counts:
        located = balanced([t for t in taught if t.location_by], lambda t: t.location, label_counts, seed=seed)
        staying = {t.key for t in located}
        taught = [
            t
            if t.location_by is None or t.key in staying
            else replace(t, location=None, location_by=None, location_true=None)
            for t in taught
        ]
    return [
        Kept(s, {**verdicts_of[s.key], "thresholds": asdict(thresholds), "arm": arm, "taught": asdict(t)})
        for s, t in zip(scenarios, taught)
        if t.location_by or t.recovery_by
    ]


def stage_examples_of(kept: list[Kept]) -> dict[str, list[dspy.Example]]:
    """What the kept scenarios teach stages 3 and 4, as worked examples: the student's own answers,
    where its arm admitted them; a recovery asked with the location the student gave it."""
    out: dict[str, list[dspy.Example]] = {"locate": [], "recover": []}
    for k in kept:
        question, chain = k.scenario.chain.question, format_steps(k.scenario.invalid_steps)
        taught, stages = k.taught, k.scenario.stages
        if taught.location_by:
            out["locate"].append(dspy.Example(question=question, chain=chain, **stages["locate"].outputs))
        if taught.recovery_by and k.scenario.oracle.get("located") is not None:
            step = k.scenario.oracle["located"] + 1
            out["recover"].append(
                dspy.Example(question=question, chain=chain, first_error_step=step, **stages["recover"].outputs)
            )
    return out


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in values.items()}
