"""Compile the self-corrector into new weights: DSPy's BootstrapFinetune, the judge as its metric,
and `LocalProvider` training a local checkpoint.

    compiled = compile_program(SelfCorrector(), trainset, lm=student_lm, metric=JudgeMetric(base_lm),
                               provider=provider, run_dir=Path("runs/c1"))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from misstep.data.records import Chain
from misstep.data.runfiles import write_json_atomic
from misstep.lm.checkpoint import SUMMARY, checkpoint_problem, recorded_digests
from misstep.lm.client import local_lm
from misstep.lm.provider import LocalProvider
from misstep.lm.training import TrainSettings
from misstep.optimize.demos import chat_records, ground_truth_chat_data, stage_name
from misstep.optimize.dspy_internals import (
    BootstrapFinetune,
    FailedPrediction,
    assert_all_predictors_have_lms,
    bootstrap_trace_data,
    prepare_teacher,
)
from misstep.programs import SelfCorrector
from misstep.programs.answer_format import AnswerAdapter

logger = logging.getLogger(__name__)
Metric = Callable[..., bool]  # metric(example, prediction, trace=None) -> keep the trace?


class NothingToTrainOn(RuntimeError):
    """Every trace failed or was rejected by the metric."""


def _failed(item: dict[str, Any]) -> bool:
    return isinstance(item["prediction"], FailedPrediction) or any(
        isinstance(outputs, FailedPrediction) for _, _, outputs in item["trace"]
    )


class RobustBootstrapFinetune(BootstrapFinetune):
    """`BootstrapFinetune` that drops failed examples and counts them instead of crashing.

    Upstream lets a `FailedPrediction` through (its score of -1 is truthy) and then fails
    formatting it, and a program that raises aborts the whole compile (DSPy #10362).
    Here such traces are dropped; `self.report` says how many and why.
    """

    report: dict[str, int]

    def __init__(
        self,
        *args,
        extra_examples: dict[str, list[dspy.Example]] | None = None,
        extra_records: list[dict] | None = None,
        weights_from: dspy.LM | None = None,
        **kwargs,
    ):
        """`extra_examples`: worked examples by stage name ("locate", "recover", ...) — ground
        truth, earlier rounds' kept traces — formatted like the traces and trained on beside
        them, so a compile never trains on the newest model output alone (the known road to
        collapse) and a model whose traces all fail still learns. `extra_records`: chat records
        already formatted, for stages that share the student's weights but are not its
        predictors (the scenario writer's), trained on in the student's fine-tune. `weights_from`: the
        LM whose weights the fine-tune starts from (default: the student's own)."""
        super().__init__(*args, **kwargs)
        self.weights_from = weights_from
        self.extra_examples = extra_examples or {}
        self.extra_records = list(extra_records or [])

    def compile(self, student: dspy.Module, trainset: list[dspy.Example], teacher: dspy.Module | None = None):
        assert_all_predictors_have_lms(student, role="student")
        traces = (
            bootstrap_trace_data(
                program=prepare_teacher(student, teacher),
                dataset=trainset,
                metric=self.metric,
                num_threads=self.num_threads or dspy.settings.num_threads,
                raise_on_error=False,
                capture_crashes=True,
            )
            if trainset
            else []
        )
        clean = [t for t in traces if not _failed(t)]
        kept = [t for t in clean if t.get("score")] if self.metric else clean
        self.report = {
            "examples": len(trainset),
            "traced": len(traces),
            "dropped_failed": len(traces) - len(clean),
            "dropped_by_metric": len(clean) - len(kept),
            "kept_traces": len(kept),
        }
        if not kept and not self.extra_examples and not self.extra_records:
            raise NothingToTrainOn(f"no trace to train on: {self.report}")

        jobs: dict[dspy.LM, dict[str, Any]] = {}
        for predictor in student.predictors():
            if predictor.lm not in jobs:  # one fine-tune per distinct LM, on all its predictors' calls
                data, data_format = (
                    self._prepare_finetune_data(trace_data=kept, lm=predictor.lm) if kept else ([], "chat")
                )
                jobs[predictor.lm] = {
                    "lm": self.weights_from or predictor.lm,
                    "train_data": data,
                    "train_data_format": data_format,
                    "train_kwargs": self.train_kwargs[predictor.lm],
                }
        self.report["trace_records"] = sum(len(job["train_data"]) for job in jobs.values())
        for name, predictor in student.named_predictors():
            jobs[predictor.lm]["train_data"] += chat_records(
                predictor,
                self.extra_examples.get(stage_name(name), []),
                self.adapter[predictor.lm] or dspy.settings.adapter,
            )
        jobs[student.predictors()[0].lm]["train_data"] += self.extra_records
        self.report["extra_records"] = (
            sum(len(job["train_data"]) for job in jobs.values()) - self.report["trace_records"]
        )
        self.report["train_records"] = self.report["trace_records"] + self.report["extra_records"]
        if not self.report["train_records"]:
            raise NothingToTrainOn(f"the kept traces hold no predictor call to train on: {self.report}")
        finetuned = self.finetune_lms(jobs)
        for predictor in student.predictors():
            predictor.lm = finetuned[predictor.lm]
            if self.exclude_demos:
                predictor.demos = []
        student._compiled = True
        return student


@dataclass
class CompileResult:
    program: SelfCorrector
    model_dir: Path
    report: dict[str, Any]


def training_examples(pairs: list[tuple[Chain, Chain]]) -> list[dspy.Example]:
    """(valid, invalid) chains as examples: the invalid chain is the input, the rest are labels."""
    return [
        dspy.Example(
            question=bad.question,
            steps=bad.steps,
            valid_steps=good.steps,
            reference_answer=good.reference_answer,
            mistake_index=bad.mistake_index,
            source_id=bad.source_id,
        ).with_inputs("question", "steps")
        for good, bad in pairs
    ]


def compile_program(
    student: SelfCorrector,
    trainset: list[dspy.Example],
    *,
    lm: dspy.LM,
    metric: Metric | None,
    provider: LocalProvider,
    run_dir: Path,
    extra_examples: dict[str, list[dspy.Example]] | None = None,
    extra_records: list[dict] | None = None,
    num_threads: int = 8,
    teacher: SelfCorrector | None = None,
    constrained: bool = True,
    weights_from: dspy.LM | None = None,
) -> CompileResult:
    """Compile `student` (running on `lm`, whose provider is `provider`) on the traces `metric` keeps:
    usually a `JudgeMetric` (stages 5-6 on their own LM), or an `OracleMetric`.

    The traces come from `student` itself (self-distillation), or from `teacher`, a
    `SelfCorrector` running on another LM. `extra_examples` (by stage: ground truth,
    earlier rounds' kept traces) are trained on beside the kept traces, and so are `extra_records`
    (chat records of other stages on the same weights: the scenario writer's). Writes
    compile_report.json and metric_decisions.jsonl into `run_dir`; the new checkpoint lies under
    the provider's checkpoint root. Demos are left out of the training prompts and of the compiled
    program: the weights carry the format now. `constrained`: the traces' answers are decoded under
    their format's grammar (the chat records they become are formatted the same either way).
    `weights_from`: an LM of `provider` whose weights are trained instead of `lm`'s (the traces still
    come from `lm`): the loop's restart from round 0.
    """
    optimizer = RobustBootstrapFinetune(
        metric=metric,
        adapter=AnswerAdapter(constrained),
        exclude_demos=True,
        num_threads=num_threads,
        train_kwargs={"settings": provider.settings},
        extra_examples=extra_examples,
        extra_records=extra_records,
        weights_from=weights_from,
    )
    student.set_lm(lm)
    with dspy.context(adapter=AnswerAdapter(constrained)):
        compiled = optimizer.compile(student, trainset, teacher=teacher)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metric_decisions.jsonl").open("w") as out:  # every keep/drop, beside the ground truth
        for decision in getattr(metric, "decisions", []):
            out.write(json.dumps(decision) + "\n")
    metric_report = metric.report() if hasattr(metric, "report") else {}
    return _finish(compiled, lm, provider, run_dir, {"bootstrap": optimizer.report, "metric": metric_report})


def warm_up(
    student: dspy.Module,
    ground_truth: dict[str, list[dspy.Example]],
    *,
    lm: dspy.LM,
    provider: LocalProvider,
    run_dir: Path,
    extra_records: list[dict] | None = None,
    settings: TrainSettings | None = None,
) -> CompileResult:
    """Round 0: fine-tune `lm` on ground-truth examples alone, with no traces, for the stages of
    `student` (a `SelfCorrector`; or a `Judge`, to give the judge weights of its own).

    A base model too small to answer in the adapter's fields leaves every trace
    unparsable, so a compile from it has nothing of its own to keep. Training first on
    worked examples (built by the injector, checked by the oracle) teaches the format;
    later compiles then have traces to judge. A judge warmed up this way has seen ground
    truth only, never the student's output, and no compile of the student trains it.
    `extra_records` (the scenario writer's ground truth, say) train the same weights; `settings`
    (default: the provider's) are the fine-tune's.
    """
    data = ground_truth_chat_data(student, ground_truth, AnswerAdapter()) + list(extra_records or [])
    if not data:
        raise NothingToTrainOn("no ground-truth example for any stage of the program")
    new_lm = lm.finetune(
        train_data=data, train_data_format="chat", train_kwargs={"settings": settings or provider.settings}
    ).result()
    if isinstance(new_lm, Exception):  # DSPy's training job hands back the exception it caught
        raise new_lm
    for predictor in student.predictors():
        predictor.lm, predictor.demos = new_lm, []
    return _finish(
        student,
        lm,
        provider,
        run_dir,
        {"warm_up": {"ground_truth_records": len(data), "of_which_extra": len(extra_records or [])}},
    )


def _finish(
    compiled: SelfCorrector, lm: dspy.LM, provider: LocalProvider, run_dir: Path, report: dict[str, Any]
) -> CompileResult:
    """Point the compiled program at an engine over its new weights and write compile_report.json."""
    # DSPy copied the LM under the new name, still pointing at the old weights: swap in one over the new.
    new_lm = compiled.predictors()[0].lm
    compiled.set_lm(provider.lm_for(new_lm))
    model_dir = provider.folder_of(new_lm)
    report = {
        **report,
        "model_dir": str(model_dir),
        "model_name": new_lm.model,
        "training": json.loads((model_dir / SUMMARY).read_text()),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "compile_report.json", report)
    return CompileResult(program=compiled, model_dir=model_dir, report=report)


def save_compiled(program: SelfCorrector, model_dir: Path, path: Path) -> None:
    """The program's JSON state (signatures, demos) and the weights' folder: nothing pickled."""
    state = program.dump_state()
    for predictor_state in state.values():
        predictor_state["lm"] = None  # the engine is rebuilt from model_dir on load
    write_json_atomic(path, {"model_dir": str(model_dir), "program": state})


def compiled_or_resumed(
    folder: Path,
    compile_step: Callable[[], CompileResult],
    *,
    provider: LocalProvider,
    program: dspy.Module | None = None,
    **lm_options,
) -> tuple[dspy.Module, bool]:
    """(the program an earlier run saved in `folder`/program.json, True), or (`compile_step()`'s
    program, saved there now, False): a rerun never trains the same step again.

    A resumed program runs through `provider`, which learns its checkpoint, so a later
    compile trains on from those weights. Where the weights are gone or not whole (a run carried
    to another machine without them, a save cut short) but their training's records are there, the
    provider makes them again from those records when they are first needed
    (`LocalProvider.ensure_weights`), and a step whose model is never asked anything costs nothing.
    Without records the step is done again from the same files, and where the first training's
    digests survive, `folder`/replayed.json says whether the weights came out the same."""
    saved = folder / "program.json"
    recorded = None
    if saved.exists():
        model_dir = Path(json.loads(saved.read_text())["model_dir"])
        problem = checkpoint_problem(model_dir)
        if problem is None or provider.replayable(model_dir):
            return load_compiled(saved, provider=provider, program=program, **lm_options), True
        logger.warning("%s names weights that are not whole, so the step is done again: %s", saved, problem)
        recorded = recorded_digests(model_dir)
    result = compile_step()
    save_compiled(result.program, result.model_dir, saved)
    if recorded:
        same = recorded_digests(Path(result.model_dir)) == recorded
        write_json_atomic(folder / "replayed.json", {"because": problem, "same_weights": same})
        logger.log(
            logging.INFO if same else logging.WARNING,
            "%s trained again: weights %s",
            folder,
            "the same as the first time" if same else "differ from the first time's",
        )
    return result.program, False


def load_compiled(
    path: Path, provider: LocalProvider | None = None, program: dspy.Module | None = None, **lm_options
) -> dspy.Module:
    """`program` (a `SelfCorrector` unless given: a `Judge`, say) from `save_compiled`'s file, running
    on the weights it names: through `provider` (its serving, fine-tunable on from there) or in-process."""
    saved = json.loads(Path(path).read_text())
    program = program or SelfCorrector()
    program.load_state(saved["program"])
    model_dir = Path(saved["model_dir"])
    program.set_lm(provider.lm(model_dir, **lm_options) if provider else local_lm(model_dir, **lm_options))
    return program
