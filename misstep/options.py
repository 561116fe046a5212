"""The command line's configuration options, mapped onto `RunConfig`'s fields in one table.

Each option's type and default are its field's (declared once, in the layer's settings); this
table adds only the option's name, the fields it sets and its help. `@configured(...)` gives a
command those options and `--config FILE`, and hands it the `RunConfig` they make: the
defaults, then the file (if any), then the options given on the command line.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import typing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from misstep.data.runfiles import RunDirBusy
from misstep.inputs import Refused
from misstep.lm.models import REGISTRY
from misstep.lm.training import LOSS_WEIGHTINGS
from misstep.metrics.injector import INJECTABLE_TYPES
from misstep.optimize.arms import KEEP_ARMS
from misstep.optimize.compile import NothingToTrainOn
from misstep.optimize.config import ConfigError, RunConfig, apply, load_config
from misstep.optimize.control import CUE_MODES, LOSSES, POSITION_MODES
from misstep.optimize.settings import SEED_MODES
from misstep.shown import console


@dataclass(frozen=True)
class Option:
    fields: tuple[str, ...]  # the config fields it sets, as paths ("train.learning_rate"); the first types it
    help: str = ""


OPTIONS: dict[str, Option] = {
    # the model and how it is served
    "model": Option(("model",), f"registered model ({', '.join(REGISTRY)}) or a local HF model folder"),
    "engine": Option(("serving",), "embedded (in-process) or vllm (a local vLLM server per checkpoint)"),
    "vllm_python": Option(("vllm.python",), "--engine vllm: the Python that has vLLM, if not this one"),
    "tensor_parallel": Option(
        ("vllm.tensor_parallel_size",),
        "--engine vllm: GPUs each server shards the model over (vLLM's tensor parallelism)",
    ),
    "vllm_arg": Option(
        ("vllm.extra_args",),
        "--engine vllm: an argument passed to every vLLM server as it is (repeat; e.g. --vllm-arg=--max-num-seqs=64)",
    ),
    "threads": Option(("loop.num_threads", "engine.max_batch_size"), "concurrent requests (the engine batches them)"),
    "seed": Option(("loop.seed", "train.seed")),
    "demos": Option(("loop.demos",), "ground-truth demos per stage in the prompts"),
    "constrained": Option(
        ("loop.constrained",), "decode every stage's answer under its format's grammar, so that it parses"
    ),
    # the data files' fields
    "question_field": Option(("data.question",), "the field holding the question"),
    "answer_field": Option(
        ("data.answer",),
        "the field holding the solution (GSM8K-shaped: steps, then '#### "
        "<answer>'), or in a labelled set the reference answer",
    ),
    "steps_field": Option(
        ("data.steps",),
        "a first-error-labelled set: the field holding its steps (a list, or one text with a step a line)",
    ),
    "label_field": Option(("data.label",), "a first-error-labelled set: the field holding the first wrong step"),
    "label_base": Option(("data.label_base",), "the number the label gives the first step (0 or 1)"),
    "no_mistake_label": Option(("data.no_mistake",), "the label value meaning 'no mistake' (besides an empty one)"),
    # training
    "method": Option(("train.method",), "lora or full"),
    "epochs": Option(("train.epochs",)),
    "learning_rate": Option(("train.learning_rate",), "default 2e-4 (LoRA) or 2e-5 (full)"),
    "lora_rank": Option(("train.lora_rank",), "LoRA rank (alpha is twice the rank)"),
    "max_length": Option(("train.max_length",), "training sequence length in tokens"),
    "batch_size": Option(("train.batch_size",)),
    "grad_accum": Option(("train.gradient_accumulation",), "gradient accumulation steps"),
    "gradient_checkpointing": Option(
        ("train.gradient_checkpointing",), "recompute activations: less memory, slower steps"
    ),
    "launcher": Option(
        ("train.launcher",),
        "train under a distributed launcher, e.g. 'torchrun --standalone "
        "--nproc-per-node 4' or 'accelerate launch --num_processes 4' (one process per GPU)",
    ),
    "loss_weighting": Option(
        ("train.loss_weighting",),
        "tokens (one mean over the answer tokens) or fields (each field's value weighs as much as all the markers)",
    ),
    "stage_balance": Option(
        ("train.stage_balance",),
        "every stage (signature) gets the same share of the loss, however many records and tokens it has",
    ),
    # the loop
    "rounds": Option(("loop.rounds",), "rounds of write, judge, keep, compile, measure"),
    "seed_chains": Option(("loop.seed_chains",), "valid chains the model writes scenarios from, per round"),
    "error_type": Option(("loop.error_types",), "error type(s), taken in turn (repeat)"),
    "ground_truth": Option(
        ("loop.ground_truth",), "ground-truth worked examples per stage, trained on beside the kept traces"
    ),
    "warm_up": Option(("loop.warm_up",), "round 0 fine-tunes on the ground truth alone"),
    "judge_warm_up": Option(
        ("loop.judge_warm_up",), "give the frozen judge its own weights, fine-tuned on ground-truth judgements alone"
    ),
    "judge_epochs": Option(
        ("loop.judge_epochs",), "epochs of the frozen judge's fine-tune (default: the compile's --epochs)"
    ),
    "judge_max_length": Option(
        ("loop.judge_max_length",),
        "tokens each of the frozen judge's training records keeps (default: the compile's --max-length)",
    ),
    "locate_warm_up": Option(
        ("loop.locate_warm_up",),
        "stage-3 chains labelled by the injector (first errors where it puts them, 15% valid) in round 0's warm-up",
    ),
    "active": Option(("loop.active_selection",), "prefer the error types and chains the model failed on last round"),
    "recovery_items": Option(
        ("loop.recovery_items",),
        "recover from only the first N chains with a mistake of the reported GSM8K set, each round (default: all)",
    ),
    "trials": Option(("loop.tuning_trials",), "Optuna trials per round for the thresholds"),
    "candidates": Option(
        ("loop.candidates",),
        "answers of stages 3-6 per written chain: the greedy one and the rest sampled (each arm keeps the good ones)",
    ),
    "candidate_temperature": Option(("loop.candidate_temperature",), "the temperature candidates are sampled at"),
    "compile_from": Option(
        ("loop.compile_from",),
        "the weights each round's compile starts from: previous (the last round's) or round-0 (a restart each round)",
    ),
    "self_judge": Option(
        ("loop.self_judge",), "the student judges its own recoveries (its weights trained on the judge's ground truth)"
    ),
    "verification_chains": Option(
        ("loop.verification_chains",),
        "chains reserved for the generation-verification gap's set (0: no gap measured)",
    ),
    "verification_size": Option(
        ("loop.verification_size",),
        "recoveries in that set, a quarter at least accepted and a quarter rejected where the chains allow",
    ),
    "seeds_from": Option(("loop.seeds_from",), "gsm8k (the --data file) or procedural (problems made each round)"),
    "level_selection": Option(
        ("loop.level_selection",), "--seeds-from procedural: curriculum (probe, then the frontier level) or uniform"
    ),
    "patience": Option(("loop.stop.patience",), "rounds without significant gain before stopping"),
}

COMMON = ("model", "threads", "demos", "seed", "constrained")
LOOP = (
    "rounds",
    "seed_chains",
    "error_type",
    "ground_truth",
    "warm_up",
    "judge_warm_up",
    "judge_epochs",
    "judge_max_length",
    "locate_warm_up",
    "active",
    "recovery_items",
    "trials",
    "candidates",
    "candidate_temperature",
    "compile_from",
    "self_judge",
    "verification_chains",
    "verification_size",
    "patience",
    "seeds_from",
    "level_selection",
)
DATA = ("question_field", "answer_field", "steps_field", "label_field", "label_base", "no_mistake_label")
TRAINING = (
    "method",
    "epochs",
    "learning_rate",
    "lora_rank",
    "max_length",
    "batch_size",
    "grad_accum",
    "gradient_checkpointing",
    "launcher",
    "loss_weighting",
    "stage_balance",
)
SERVING = ("engine", "vllm_python", "tensor_parallel", "vllm_arg")


def _field(path: str) -> tuple[Any, Any]:
    """(type, default) of a RunConfig field given as a path."""
    settings: Any = RunConfig()
    *sections, name = path.split(".")
    for section in sections:
        settings = getattr(settings, section)
    return typing.get_type_hints(type(settings))[name], getattr(settings, name)


def _parameter(name: str) -> inspect.Parameter:
    kind, default = _field(OPTIONS[name].fields[0])
    if typing.get_origin(kind) in (list, tuple):  # a repeated option; not given, the field's default stands
        kind, default = list[typing.get_args(kind)[0]] | None, None
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, typer.Option(help=OPTIONS[name].help)],
    )


def config_from(values: dict[str, Any], file: Path | None, given: set[str]) -> RunConfig:
    """The RunConfig of a command: `file` on top of the defaults, then the options in `given`
    (those on the command line; without a file, every option, which is its default otherwise),
    all at once (a labelled set names its steps and its label together). A value a field
    refuses is an error that names the option."""
    config = load_config(file) if file else RunConfig()
    chosen = {
        name: value
        for name, value in values.items()
        if not ((file and name not in given) or (value is None and _repeated(name)))
    }
    try:
        return apply(config, _changes(chosen), "")
    except ConfigError as exc:
        where, _, rest = str(exc).partition(": ")
        detail = rest if where in _sections(RunConfig) else str(exc)  # the option will say where
        for name in chosen:  # the option without which the rest is accepted is the one to name
            try:
                apply(config, _changes({k: v for k, v in chosen.items() if k != name}), "")
            except ConfigError:
                continue
            raise ConfigError(f"--{name.replace('_', '-')}: {detail}") from None
        raise ConfigError(f"the options together: {detail}") from None


def _sections(config_type: type, prefix: str = "") -> set[str]:
    """The paths of RunConfig's sections ("train", "loop", "loop.stop", ...)."""
    out = set()
    for f in dataclasses.fields(config_type):
        hint = typing.get_type_hints(config_type)[f.name]
        if dataclasses.is_dataclass(hint):
            out |= {prefix + f.name} | _sections(hint, prefix + f.name + ".")
    return out


def _changes(values: dict[str, Any]) -> dict[str, Any]:
    """Option values as nested changes of RunConfig's fields."""
    changes: dict[str, Any] = {}
    for name, value in values.items():
        for path in OPTIONS[name].fields:
            *sections, field_name = path.split(".")
            inner = changes
            for section in sections:
                inner = inner.setdefault(section, {})
            inner[field_name] = value
    return changes


def _repeated(name: str) -> bool:
    return typing.get_origin(_field(OPTIONS[name].fields[0])[0]) in (list, tuple)


def refusing(command):
    """The commands' error boundary: a run that cannot go on as asked ends with one red line that
    says why (naming the file or option) and exit status 2, instead of a traceback."""

    @functools.wraps(command)
    def guarded(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        # RunDirBusy: another process writes there, nothing touched; NothingToTrainOn: the round kept nothing.
        except (Refused, RunDirBusy, NothingToTrainOn) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Every run file is written whole or not at all (data/runfiles.py), so what is there stays.
            where = f" writing {exc.filename}" if exc.filename else ""
            console.print(
                f"[red]error:[/red] the disk is full{where}. Free space and run the same command again: "
                "it continues from the files already written, none of which is half-written."
            )
            raise typer.Exit(2) from None

    guarded.refuses = True  # marks the boundary, so a test can check that every command has it
    return guarded


def configured(*names: str):
    """Give a command the options `names` (keys of OPTIONS) and `--config`; it receives `config: RunConfig`."""

    def wrap(command):
        signature = inspect.signature(command)
        # The command's annotations resolved where it was written (they may be strings there).
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name != "config"
        ]
        config_file = inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config",
                    help="a TOML file of settings (see misstep.optimize.config); options given here override it",
                ),
            ],
        )

        @functools.wraps(command)
        @refusing
        def run(**kwargs):
            values = {name: kwargs.pop(name) for name in names}
            file = kwargs.pop("config_file")
            context = kwargs.pop("context")
            # By name: typer may bring its own copy of click's ParameterSource.
            given = {
                name
                for name in names
                if getattr(context.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")
            }
            try:
                config = config_from(values, file, given)
            except (ConfigError, ValueError) as exc:
                raise Refused(str(exc)) from None
            return command(config=config, **kwargs)

        context = inspect.Parameter("context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        run.__signature__ = signature.replace(
            parameters=own + [_parameter(n) for n in names] + [config_file, context], return_annotation=None
        )
        run.__annotations__ = {p.name: p.annotation for p in run.__signature__.parameters.values()}
        return run

    return wrap


def option_names(config_type: type = RunConfig) -> list[str]:
    """Every field path of `config_type` (for the docs and a test that the table names real fields)."""
    out = []
    for f in dataclasses.fields(config_type):
        hint = typing.get_type_hints(config_type)[f.name]
        if dataclasses.is_dataclass(hint):
            out += [f"{f.name}.{inner}" for inner in option_names(hint)]
        else:
            out.append(f.name)
    return out


# -- options of one command alone (not settings of a run) --------------------------------------------------------


def _option(kind: Any, help: str, *names: str, **kwargs: Any) -> Any:
    return Annotated[kind, typer.Option(*names, help=help, **kwargs)]


def _choices(name: str, values: tuple[str, ...]) -> type[StrEnum]:
    """An option's choices, refused by the command line itself (naming the option) when not one of them."""
    return StrEnum(name, {value: value for value in values})


RunDir = _option(Path | None, "where results go; rerun with the same one to resume")
DemoData = _option(Path | None, "valid GSM8K chains for demos (default: shipped train sample)")
Splits = _option(
    Path | None,
    "folder of held-out split files (<set>-test.jsonl, <set>-validation.jsonl; default: the committed ones, "
    "built by `misstep splits`)",
)
GenerateData = _option(Path | None, "valid chains (GSM8K JSONL); default: shipped train sample")
Chains = _option(int, "how many chains to run the cycle over", min=1)
Temperature = _option(float, "sampling temperature (0: greedy)", min=0.0)
EvaluateData = _option(
    list[Path] | None,
    "labelled chains: BIG-Bench Mistake JSONL, or GSM8K (labelled by the injector); repeatable; "
    "default: the shipped samples",
)
PerFile = _option(int | None, "at most this many chains per file", min=1)
Recover = _option(bool, "also recover from the labelled first error")
CompileData = _option(
    Path | None, "valid GSM8K chains to train on, corrupted by the injector (default: shipped train sample)"
)
TrainSize = _option(int, "training examples (invalid chains) to trace", min=1)
WarmUpFirst = _option(
    bool, "first fine-tune on the ground truth alone, so the student's own traces parse", "--warm-up/--no-warm-up"
)
Metric = _option(str, "which traces to keep: judge (stages 5-6 on the frozen base model) or oracle (ground truth)")
JudgeWarmUp = _option(
    bool,
    "give the judge its own weights: the base model fine-tuned on the ground truth's judge and curation examples "
    "alone (the 135M base model cannot answer in the judge's fields)",
    "--judge-warm-up/--no-judge-warm-up",
)
Heldout = _option(Path | None, "held-out GSM8K chains (default: shipped test sample)")
HeldoutSize = _option(int, "held-out examples for before/after accuracy", min=1)
MinConfidence = _option(float, "judge confidence to keep a trace", min=0.0, max=1.0)
MinQuality = _option(float, "curation quality to keep a trace", min=0.0, max=1.0)
OptimizeData = _option(
    Path | None, "valid GSM8K chains the loop draws seeds and ground truth from (default: shipped train sample)"
)
SplitLimit = _option(int | None, "measure only the first N items of each split (a quick run; default: all)", min=1)
LevelSets = _option(
    list[int] | None, "procedural difficulty level whose held-out sets are measured each round (repeat)"
)
Keep = _option(
    list[_choices("Keep", KEEP_ARMS)] | None,
    "which of the student's own answers a round trains on: judge, oracle, all or random; "
    "several (repeat) run side by side from one shared round 0, under RUN_DIR/arm-<arm>/",
)
SeedModes = _option(
    list[_choices("SeedMode", tuple(SEED_MODES))] | None,
    "where seed chains come from: gsm8k (the --data file), curriculum or uniform (procedural problems at the "
    "level the curriculum chooses, or at levels drawn uniformly); several (repeat) run side by side from one "
    "round 0, under RUN_DIR/arm-<mode>/",
)
Arms = _option(
    list[str] | None,
    "an arm by name, <keep> or <keep>-<seed mode> (judge, oracle-uniform, ...): repeat to run exactly these side "
    "by side from one round 0 (where --keep and --seed-mode run every combination); not with either",
)
BbmTasks = _option(
    list[str] | None,
    "BIG-Bench Mistake task measured each round (repeat): word_sorting, multistep_arithmetic, logical_deduction",
)
BbmAtBest = _option(
    list[str] | None,
    "BIG-Bench Mistake task measured on round 0 and each arm's best round only, once the arms are done (repeat)",
)
SplitsGsm8k = _option(Path, "GSM8K test solutions the GSM8K splits are built from")
SplitsBbm = _option(
    list[Path] | None,
    "BIG-Bench Mistake task files (repeat); default: every .jsonl beside --gsm8k's ../big-bench-mistake",
)
SplitsOut = _option(Path, "where the split files go")
ControlData = _option(Path, "valid GSM8K chains to train on, labelled by the injector")
ControlSplit = _option(
    Path | None,
    "the held-out split to measure on (choose settings on a -validation split, report on -test); default: "
    "data/splits/gsm8k-test.jsonl, or the --level's test split",
)
ControlSizes = _option(list[int] | None, "stage-3 training chains (repeat)", "--size", min=1)
ControlCue = _option(
    list[_choices("Cue", CUE_MODES)] | None, "'cue' (the first error marked), 'real', or both (repeat)"
)
ControlLearningRates = _option(list[float] | None, "learning rate (repeat; default 1e-4)")
ControlEpochs = _option(list[float] | None, "(repeat)", min=0.01)
ControlLoss = _option(
    list[_choices("Loss", LOSSES)] | None,
    "stage3 (stage-3 records alone) or all (with the other stages' ground truth, as the loop trains) (repeat)",
)
ControlBeta2 = _option(list[float] | None, "AdamW's second-moment decay (repeat; default 0.999)", min=0.5, max=0.9999)
ControlWeighting = _option(
    list[_choices("LossWeighting", LOSS_WEIGHTINGS)] | None,
    "tokens (one mean over the answer tokens) or fields (each field's value weighs as much as all markers) "
    "(repeat; default tokens)",
)
ControlPositions = _option(
    list[_choices("Positions", POSITION_MODES)] | None,
    "where training chains' first errors lie: balanced (even over steps 1-5 and 6+), natural (the injector's "
    "choice, as the held-out splits), or pairs (each question twice, errors at two steps) (repeat; default balanced)",
)
ControlLevel = _option(
    int | None,
    "train on procedural problems of this difficulty level (data/procedural.py) instead of --data; measured on "
    "that level's test split unless --split names another",
    min=1,
)
ControlLoraRank = _option(
    int | None,
    "train a LoRA adapter of this rank on every linear layer (merged into the run's weights) instead of every weight",
    min=1,
)
ControlErrorType = _option(
    _choices("InjectedType", INJECTABLE_TYPES) | None,
    "inject this error type alone into the training chains, and measure on that type's held-out items and the "
    "valid chains (default: every type, in turn)",
)
ControlRunDir = _option(Path, "one folder per run; rerun to resume")
ControlConstrained = _option(
    bool,
    "measure stage 3 under its answer grammar (files of their own); off by default: the control measures the "
    "model's own answers, as its first runs did",
)
ControlResults = _option(
    Path | None,
    "also record every finished run here (JSON; its predictions and slices beside it), e.g. docs/results/control.json",
)
Model = _option(str, f"registered model ({', '.join(REGISTRY)}) or a local HF model folder")
Threads = _option(int, "concurrent requests (the engine batches them)", min=1)
BatchSize = _option(int, "training batch size", min=1)
MaxLength = _option(int, "training sequence length in tokens", min=16)
Prepare = _option(str | None, "convert this registered model now (else on first use)")
