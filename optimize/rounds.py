"""The self-improvement loop: round 0 is the model it starts from; each round after gets training
examples from a source (by default the current model writes scenarios, the frozen judge scores
them under Optuna-tuned thresholds, and the round's arm admits some of the student's own answers:
optimize/sources.py), BootstrapFinetune compiles the student on them and on everything earlier
rounds kept (training the last round's weights, or round 0's: `compile_from`), and the new model is
measured on held-out sets. `misstep compile` is one round of it, fed by the injector instead of the
writer.

    history = run_loop(train_chains, heldout, provider=provider, judge_lm=judge_lm,
                       settings=LoopSettings(rounds=3), run_dir=Path("runs/loop"))

Every step of a round leaves a file behind; a rerun skips the steps whose file exists,
so a killed run continues from the last finished step (and, inside the generating and
evaluating steps, from the last finished record). A run carried to another machine without its
weights makes each round's weights again from their training's records when they are first
needed (`LocalProvider.ensure_weights`), and only those.

RUN_DIR/
  loop.json                      settings, and the seed chains kept out (held-out questions)
  optuna.db                      the threshold studies (optuna-dashboard sqlite:///optuna.db)
  judge/                         the judge's own weights (after a judge warm-up): program.json; its
                                 ground truth's make-up (judge_truth.json) and the base model's
                                 recoveries its failures are drawn from (written_recoveries.jsonl)
  round-0/                       the starting model: heldout/, program.json (after a warm-up)
  round-N/selection.json         which seed chains and error types, and why       } written
          scenarios.jsonl        every stage's output, the judge's and curator's   } scenarios
                                 verdicts, the oracle's                            } only
          tuning.json            the thresholds Optuna chose and the trial values  }
          kept.jsonl             the scenarios the arm taught from, each with why  }
          program.json, compile_report.json, metric_decisions.jsonl    the compile (weights under checkpoints/)
          heldout/<set>/         predictions and metrics on the held-out sets
          round.json             this round's row of the history, the stop rule's verdict, and the
                                 seconds each step took in the process that ran it
  best.json                      the best round and its weights
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import dspy

from misstep.data.records import Chain
from misstep.data.runfiles import holds_run_dir, timed, write_json_atomic
from misstep.data.splits import without_heldout
from misstep.lm.checkpoint import SUMMARY
from misstep.lm.client import release
from misstep.lm.provider import LocalProvider
from misstep.lm.training import TrainSettings
from misstep.metrics.health import judge_health
from misstep.metrics.stats import Rate
from misstep.optimize.compile import CompileResult, compile_program, compiled_or_resumed, warm_up
from misstep.optimize.control import control_chains, training_records
from misstep.optimize.demos import (
    attach_demos,
    demos_of,
    ground_truth_chat_data,
    ground_truth_demos,
    questions_of,
    writer_chat_data,
    writer_ground_truth,
)
from misstep.optimize.jobs import JobSettings, evaluate
from misstep.optimize.judge_data import composition, injected_pairs, judge_examples, written_failures
from misstep.optimize.settings import LoopSettings
from misstep.optimize.sources import Round, RoundExamples, RoundSource, WrittenScenarios
from misstep.optimize.verification import GapMeter, build_set, student_as_judge, training_fit, verdicts
from misstep.programs import Judge, SelfCorrector
from misstep.programs.answer_format import AnswerAdapter

__all__ = ["LoopSettings", "refuse_another_judge", "run_loop"]


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
    source: RoundSource | None = None,
    demo_chains: list[Chain] | None = None,
    start_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) the loop; return the history, one row per round (round 0 = the start).

    `heldout` holds the sets reported (the test splits); `validation` the disjoint sets the stop
    rule and the best round are chosen on, so that the reported figures were never used to
    choose. Without `validation` the choice falls back to `heldout`, and round.json says so.
    `source` feeds each round (default: `WrittenScenarios`); demos are drawn from `demo_chains`
    if given, else from the training chains. `start_dir` (default `run_dir`) holds the judge and
    round 0: loops that share one (the arms of `run_arms`) start from the same models. The run
    directory is this process's while it runs (`RunLock`)."""
    source = source or WrittenScenarios()
    run_dir.mkdir(parents=True, exist_ok=True)
    measured = {"heldout": heldout, "validation": validation or {}}
    start = _starting_data(train_chains, measured, demo_chains, settings, writes=source.writes)
    _refuse_empty(start, settings, len(train_chains), seeds_from_pool=source.writes and settings.seeds_from == "gsm8k")
    start_dir = start_dir or run_dir
    refuse_another_judge(start_dir, settings, provider.settings)
    _write_loop_json(run_dir, settings, source, start, heldout, start_dir)
    seconds: dict[str, float] = {}  # round 0's steps
    judge = _frozen_judge(start, judge_lm, provider, settings, start_dir / "judge", seconds)
    # Records of other programs on the student's weights, in every fine-tune: the writer's, and
    # with self_judge the judge's ground truth (the student then judges its own recoveries).
    records = list(start.writer_records)
    if settings.self_judge:
        truth = _judge_truth(start, judge_lm, settings, start_dir / "judge")
        records += ground_truth_chat_data(Judge(), truth, AnswerAdapter())
    round_0 = _round_dir(start_dir, 0)
    student = _starting_student(start, provider, settings, round_0, seconds, records + start.locate_records)
    with timed(seconds, "verification_set"):
        gap = _gap_meter(start, student, judge, settings, start_dir)
    history = [_finish_round(0, round_0, student, measured, {}, settings, history=[], seconds=seconds, gap=gap)]

    # The weights every compile starts from with compile_from "round-0" (with "previous": the last round's).
    round_0_lm = student.predictors()[0].lm if settings.compile_from == "round-0" else None
    kept_so_far: dict[str, list[dspy.Example]] = {}
    labels = _label_counts(validation or heldout)
    for r in range(1, settings.rounds + 1):
        folder, seconds = _round_dir(run_dir, r), {}
        # The writer's weights know its format once a warm-up or a compile has trained them on it.
        trained = start.writer_types if settings.warm_up or r > 1 else set()
        # self_judge: stages 5-6 on the student's weights, trained on the judge's ground truth.
        scorer = student_as_judge(student) if settings.self_judge else judge
        round_ = Round(
            r, folder, run_dir, student, scorer, start.demos, start.pool, history, settings, trained, seconds, labels
        )
        made = source.make(round_)
        made.row["judged_by"] = scorer.predictors()[0].lm.model  # the frozen judge, or the student itself
        # Accumulate: the ground truth, every earlier round's kept examples, and this round's.
        extra = _merge(start.truth, kept_so_far, made.examples)
        student = _compiled(student, made, extra, records, provider, folder, settings, seconds, start=round_0_lm)
        for stage, stage_examples in made.for_later_rounds.items():
            kept_so_far.setdefault(stage, []).extend(stage_examples)
        history.append(
            _finish_round(r, folder, student, measured, made.row, settings, history, seconds=seconds, gap=gap)
        )
        if history[-1]["verdict"]["stop"]:
            break

    best = history[-1]["verdict"]["best_round"]
    best_dir = _round_dir(start_dir if best == 0 else run_dir, best)
    write_json_atomic(
        run_dir / "best.json",
        {"round": best, "program": str(best_dir / "program.json"), "verdict": history[-1]["verdict"]},
    )
    # The models this call loaded go with it: an engine holds its weights until it is closed, and
    # run_arms calls run_loop once an arm and a round, each call loading its judge and students again.
    for lm in (student.predictors()[0].lm, judge.predictors()[0].lm, round_0_lm):
        if lm is not None and lm is not judge_lm:  # the caller's
            release(lm)
    return history


# -- the start: ground truth, the judge, round 0's student -------------------------------------


@dataclass
class StartingData:
    """What the loop starts from, drawn once from the training chains (no held-out question in any)."""

    demos: dict[str, list[dspy.Example]]  # per stage, in the prompts of the judge (and of a student without warm-up)
    truth: dict[str, list[dspy.Example]]  # ground-truth worked examples per stage, trained on in every compile
    writer_records: list[dict[str, Any]]  # stages 1-2's ground truth as chat records, one per injected mistake
    writer_counts: dict[str, int]  # writer examples per error type
    writer_types: set[str]  # the error types the writer is trained on
    judge_chains: list[Chain]  # the chains the judge's ground truth is made from (optimize/judge_data.py)
    verification_chains: list[Chain]  # the generation-verification gap's chains (optimize/verification.py)
    locate_records: list[dict[str, Any]]  # stage 3's warm-up records on the control's data (locate_warm_up)
    pool: list[Chain]  # the valid chains left for seeds


def _starting_data(
    train_chains: list[Chain],
    measured: dict[str, dict[str, list[Chain]]],
    demo_chains: list[Chain] | None,
    settings: LoopSettings,
    *,
    writes: bool,
) -> StartingData:
    """Demos, ground truth and the writer's ground truth, each from chains none of the others used."""
    # No held-out question (test or validation) reaches a demo, the ground truth or a seed.
    measured_chains = [c for sets in measured.values() for chains in sets.values() for c in chains]
    pool = without_heldout([c for c in train_chains if c.is_valid], measured_chains)
    demo_pool = (
        pool if demo_chains is None else without_heldout([c for c in demo_chains if c.is_valid], measured_chains)
    )
    demos = ground_truth_demos(demo_pool, k=settings.demos, seed=settings.seed) if settings.demos else {}
    used = questions_of(demos)
    unused = [c for c in pool if c.question not in used]
    truth = ground_truth_demos(unused, k=settings.ground_truth, seed=settings.seed + 1) if settings.ground_truth else {}
    used |= questions_of(truth)
    # A writer (stages 1-2) shares the student's weights; it is trained on injected mistakes of
    # each error type, in the warm-up and in every compile, so the chains it writes stay checkable.
    writer_truth = {}
    if settings.ground_truth and writes:
        unused = [c for c in pool if c.question not in used]
        writer_truth = writer_ground_truth(
            unused, settings.error_types, k=settings.ground_truth, seed=settings.seed + 2
        )
    for examples in writer_truth.values():
        used |= questions_of(examples)
    # The judge's ground truth: a success and a failure per chain, some failures written by the model.
    unused = [c for c in pool if c.question not in used]
    judge_chains = unused[: 2 * settings.ground_truth] if settings.judge_warm_up or settings.self_judge else []
    used |= {c.question for c in judge_chains}
    unused = [c for c in pool if c.question not in used]
    verification_chains = unused[: settings.verification_chains]
    used |= {c.question for c in verification_chains}
    located = []
    if settings.locate_warm_up:
        unused = [c for c in pool if c.question not in used]
        located = control_chains(unused, settings.locate_warm_up, seed=settings.seed + 5, positions="natural")
        used |= {c.question for c in located}
    return StartingData(
        demos=demos,
        truth=truth,
        writer_records=writer_chat_data(writer_truth, AnswerAdapter()),
        writer_counts={t: len(e["describe"]) for t, e in writer_truth.items()},
        writer_types={t for t, examples in writer_truth.items() if examples["describe"]},
        judge_chains=judge_chains,
        verification_chains=verification_chains,
        locate_records=training_records(located, cue=False, loss="stage3"),
        pool=[c for c in pool if c.question not in used],
    )


def _refuse_empty(start: StartingData, settings: LoopSettings, given: int, *, seeds_from_pool: bool) -> None:
    """A loop whose training file leaves nothing for its seeds or its judge would run for hours and
    learn nothing: refused before anything is written, with the counts."""
    empty = []
    if seeds_from_pool and settings.seed_chains and not start.pool:
        empty.append(f"no chain is left for the {settings.seed_chains} seed chains a round")
    if (settings.judge_warm_up or settings.self_judge) and settings.ground_truth and not start.judge_chains:
        empty.append("no chain is left for the judge's ground truth")
    if empty:
        raise ValueError(
            f"{given} training chains are too few once demos, ground truth and held-out questions are "
            f"taken: {'; and '.join(empty)}. Pass a larger file with --data (the full GSM8K train set is "
            "../shared/data/gsm8k/train.jsonl)."
        )


def _write_loop_json(
    run_dir: Path,
    settings: LoopSettings,
    source: RoundSource,
    start: StartingData,
    heldout: dict[str, list[Chain]],
    start_dir: Path,
) -> None:
    shared = {} if start_dir == run_dir else {"start_dir": os.path.relpath(start_dir, run_dir)}
    write_json_atomic(
        run_dir / "loop.json",
        {
            "settings": {**asdict(settings), "stop": asdict(settings.stop)},
            "source": type(source).__name__,
            "pool": len(start.pool),
            "heldout": {k: len(v) for k, v in heldout.items()},
            "writer_ground_truth": start.writer_counts,
            **shared,  # the judge and round 0 are there
        },
    )


def _frozen_judge(
    start: StartingData,
    judge_lm: dspy.LM,
    provider: LocalProvider,
    settings: LoopSettings,
    folder: Path,
    seconds: dict[str, float],
) -> Judge:
    """The frozen judge: compiling the student never trains it. The 135M base model cannot answer
    in the judge's fields, so by default the judge is the base model fine-tuned once on
    ground-truth judgements (it never sees the student's output in training)."""
    if not settings.judge_warm_up:
        judge = attach_demos(Judge(), start.demos)
        judge.set_lm(judge_lm)
        return judge

    def judge_warm_up() -> CompileResult:
        truth = _judge_truth(start, judge_lm, settings, folder)
        return warm_up(
            Judge(),
            truth,
            lm=judge_lm.copy(provider=provider),
            provider=provider,
            run_dir=folder,
            settings=judge_training(settings, provider.settings),
        )

    with timed(seconds, "judge_warm_up"):
        judge, _ = compiled_or_resumed(folder, judge_warm_up, provider=provider, program=Judge())
        fit = folder / "training_fit.json"
        if not fit.exists():  # the positive control: does it give back what it was taught?
            weights = Path(json.loads((folder / "program.json").read_text())["model_dir"])
            write_json_atomic(fit, training_fit(judge.predictors()[0].lm, weights))
    return judge


def judge_training(settings: LoopSettings, train: TrainSettings) -> TrainSettings:
    """The frozen judge's fine-tune: the compile's, with the loop's judge_* settings where given."""
    return replace(
        train,
        epochs=train.epochs if settings.judge_epochs is None else settings.judge_epochs,
        max_length=train.max_length if settings.judge_max_length is None else settings.judge_max_length,
        gradient_checkpointing=(
            train.gradient_checkpointing
            if settings.judge_gradient_checkpointing is None
            else settings.judge_gradient_checkpointing
        ),
    )


def refuse_another_judge(run_dir: Path, settings: LoopSettings, train: TrainSettings) -> None:
    """A resumed run keeps the judge it trained (RUN_DIR/judge); asked for one trained differently it
    is refused, before anything is written, rather than handed the old one."""
    if not settings.judge_warm_up:
        return
    folder = run_dir / "judge"
    asked = judge_training(settings, train)
    saved = folder / "program.json"
    summary = Path(json.loads(saved.read_text())["model_dir"]) / SUMMARY if saved.exists() else None
    if summary is None or not summary.exists():  # no judge yet, or its checkpoint folder is gone: it trains anew
        return
    trained = json.loads(summary.read_text())["settings"]
    differ = [
        f"{setting} = {trained[field]:g} (asked: {getattr(asked, field):g})"
        for setting, field in (("judge_epochs", "epochs"), ("judge_max_length", "max_length"))
        if trained[field] != getattr(asked, field)
    ]
    if differ:
        raise ValueError(
            f"{saved}: this run's judge was trained with {', '.join(differ)}. Move {folder} aside to train "
            "a new judge (every round it judged then needs doing again), or set what it was trained with."
        )


def _judge_truth(
    start: StartingData, base_lm: dspy.LM, settings: LoopSettings, folder: Path
) -> dict[str, list[dspy.Example]]:
    """The ground truth a judge learns from: the judge's examples have as negatives recoveries the
    base model itself writes that the oracle rejects, where it writes one, else partial fixes or
    copies, with confidence in levels (optimize/judge_data.py; made once, kept in `folder`)."""
    pairs = injected_pairs(start.judge_chains, k=settings.ground_truth, seed=settings.seed + 3)
    failures = written_failures(
        pairs,
        base_lm,
        start.demos,
        folder / "written_recoveries.jsonl",
        num_threads=settings.num_threads,
        constrained=settings.constrained,
    )
    examples = judge_examples(pairs, failures)
    write_json_atomic(folder / "judge_truth.json", composition(examples))
    return {**start.truth, "judge": examples}


def _starting_student(
    start: StartingData,
    provider: LocalProvider,
    settings: LoopSettings,
    folder: Path,
    seconds: dict[str, float],
    extra_records: list[dict[str, Any]],
) -> SelfCorrector:
    """Round 0: the model the loop starts from (after a warm-up on the ground truth alone, if set)."""
    if not settings.warm_up:
        student = attach_demos(SelfCorrector(), start.demos)
        student.set_lm(provider.lm())
        return student

    def warm_up_student() -> CompileResult:
        base = provider.lm()  # loaded only when round 0 is trained, not when it is resumed
        try:
            return warm_up(
                SelfCorrector(),
                start.truth,
                lm=base,
                provider=provider,
                run_dir=folder,
                extra_records=extra_records,
            )
        finally:
            release(base)

    with timed(seconds, "warm_up"):
        student, _ = compiled_or_resumed(folder, warm_up_student, provider=provider)
    return student


def _compiled(
    student: SelfCorrector,
    made: RoundExamples,
    extra: dict[str, list[dspy.Example]],
    writer_records: list[dict[str, Any]],
    provider: LocalProvider,
    folder: Path,
    settings: LoopSettings,
    seconds: dict[str, float],
    start: dspy.LM | None = None,
) -> SelfCorrector:
    """The round's new student: `student` compiled on the round's examples and on `extra`, its weights
    trained on from `start`'s (round 0's, say), else from its own. Its traces, where the round has a
    trainset, are always `student`'s own."""
    previous = student.predictors()[0].lm
    _refuse_other_start(folder, provider.folder_of(start or previous), settings)
    with timed(seconds, "compile"):
        compiled, _ = compiled_or_resumed(
            folder,
            lambda: compile_program(
                student,
                made.trainset,
                lm=previous,
                weights_from=start,
                metric=made.metric,
                provider=provider,
                run_dir=folder,
                extra_examples=extra,
                extra_records=writer_records,
                num_threads=settings.num_threads,
                constrained=settings.constrained,
            ),
            provider=provider,
            max_batch_size=settings.num_threads,
        )
    release(previous)  # the round's model is done with: one student in memory at a time
    return compiled


def _refuse_other_start(folder: Path, expected: Path, settings: LoopSettings) -> None:
    """A round compiled from other weights than `compile_from` now asks for is refused, rather than
    resumed as if it had been trained as asked."""
    report = folder / "compile_report.json"
    if not report.exists():
        return
    trained_from = Path(json.loads(report.read_text())["training"]["base_model"])
    if trained_from.resolve() != expected.resolve():
        raise ValueError(
            f"{report}: this round was compiled from {trained_from}, but compile_from = {settings.compile_from!r} "
            f"asks for {expected}. Move its compile (program.json, compile_report.json, metric_decisions.jsonl) "
            "and what was measured on it (heldout/, validation/, verification/, round.json) aside to compile it "
            "again, or set compile_from as it was."
        )


def _gap_meter(
    start: StartingData, student: SelfCorrector, judge: Judge, settings: LoopSettings, start_dir: Path
) -> GapMeter | None:
    """The verification set, made once from round 0's recoveries, and the frozen judge's verdicts on it."""
    if not start.verification_chains:
        return None
    options = {"num_threads": settings.num_threads, "constrained": settings.constrained}
    items = build_set(
        start.verification_chains,
        student,
        start_dir / "verification.jsonl",
        size=settings.verification_size,
        temperature=settings.candidate_temperature,
        seed=settings.seed + 4,
        **options,
    )
    frozen = verdicts(items, judge, start_dir / "verification-frozen.jsonl", **options)
    # The student's weights learn to judge only under self_judge; until then its prompts show demos.
    return GapMeter(items, frozen, {} if settings.self_judge else start.demos, **options)


# -- the end of a round --------------------------------------------------------------------------


def _finish_round(
    r: int,
    folder: Path,
    student: SelfCorrector,
    measured: dict[str, dict[str, list[Chain]]],
    made: dict[str, Any],
    settings: LoopSettings,
    history: list[dict[str, Any]],
    seconds: dict[str, float] | None = None,
    gap: GapMeter | None = None,
) -> dict[str, Any]:
    """Measure the round's model on the held-out sets (`measured`: "heldout", the reported test sets,
    and "validation", the sets choices are made on) and write round.json with what the round's
    source recorded (`made`), the stop rule's verdict and the seconds each step took here (a step
    resumed from its file takes ~0). A finished round keeps its measurements; only its verdict is
    given again, by `settings.stop` as it is now (below)."""
    if (folder / "round.json").exists():
        return _verdict_again(json.loads((folder / "round.json").read_text()), history, settings, folder)
    seconds = dict(seconds or {})
    row: dict[str, Any] = {"round": r, "model": student.predictors()[0].lm.model}
    with timed(seconds, "heldout"):
        row |= measure(student, folder, measured, settings)
    row["chosen_on"] = "validation" if measured.get("validation") else "heldout"
    if gap is not None:
        with timed(seconds, "verification"):
            row["verification"] = gap.row(student, folder)
    row.update(made)
    row["answers"] = _answers(row)
    row["verdict"] = _verdict(row, history, settings)
    row["seconds"] = {step: round(value, 1) for step, value in seconds.items()}
    write_json_atomic(folder / "round.json", row)
    return row


def _verdict(row: dict[str, Any], history: list[dict[str, Any]], settings: LoopSettings) -> dict[str, Any]:
    """The stop rule's verdict on the rounds up to `row`."""
    past = [*history, row]
    verdict = judge_health(
        [_primary(h, settings.primary_metric) for h in past],
        [h.get("diversity", {}).get("distinct_2") for h in past],
        settings.stop,
        top_share=[(h.get("answers") or {}).get("top_share") for h in past],
    )
    return asdict(verdict)


def _verdict_again(
    row: dict[str, Any], history: list[dict[str, Any]], settings: LoopSettings, folder: Path
) -> dict[str, Any]:
    """A finished round's row, its verdict given again by the stop rule the run resumes with: a run
    resumed under a new rule (a fixed budget for an arm that a collapse had stopped) goes on or stops
    by that rule, not the one its round was finished under. A changed verdict is written to round.json
    with the ones before it kept under "verdicts_before"."""
    verdict = _verdict(row, history, settings)
    if verdict == row["verdict"]:
        return row
    row = {**row, "verdicts_before": [*row.get("verdicts_before", []), row["verdict"]], "verdict": verdict}
    write_json_atomic(folder / "round.json", row)
    return row


def measure(
    student: SelfCorrector, folder: Path, measured: dict[str, dict[str, list[Chain]]], settings: LoopSettings
) -> dict[str, Any]:
    """The student's metrics on each set of `measured` ("heldout" under folder/heldout/<set>,
    "validation" under folder/validation/<set>); recovery on the reported GSM8K set only (its first
    `settings.recovery_items` chains with a mistake)."""
    lm = student.predictors()[0].lm
    demos = demos_of(student)
    out: dict[str, Any] = {}
    for kind, sets in measured.items():
        out[kind] = {}
        for name, chains in sets.items():
            job = JobSettings(folder / kind / name, settings.num_threads, demos, constrained=settings.constrained)
            # By the set's name, not its chains' task: the procedural levels are GSM8K-shaped too.
            recover = kind == "heldout" and name == "gsm8k"
            result = evaluate(chains, lm, job, recover=recover, recover_limit=settings.recovery_items)
            out[kind][name] = {
                task: {k: v for k, v in m.items() if k in _ROUND_METRICS}
                for task, m in result.items()
                if not task.startswith("_")
            }
    return out


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


def _label_counts(sets: dict[str, list[Chain]]) -> dict[int | None, int]:
    """How often each first error (0-based step; None: no mistake) is the answer in the GSM8K set."""
    return dict(Counter(chain.mistake_index for chain in sets.get("gsm8k", [])))


def _merge(*sets: dict[str, list[dspy.Example]]) -> dict[str, list[dspy.Example]]:
    merged: dict[str, list[dspy.Example]] = {}
    for examples in sets:
        for stage, items in examples.items():
            merged.setdefault(stage, []).extend(items)
    return merged
