"""The `misstep` command line: a thin shell over misstep.optimize (jobs and compile)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from misstep.data import DataFileError, Fields, LoadReport, load_chains, sample_path
from misstep.data.runfiles import RunDirBusy, RunLock, write_json_atomic
from misstep.data.splits import load_split, save_split, split_path, without_heldout
from misstep.lm import DEFAULT_MODEL, REGISTRY, ModelNotFoundError, local_lm, resolve_model
from misstep.lm.provider import LocalProvider
from misstep.lm.serving import vllm_available
from misstep.lm.training import LOSS_WEIGHTINGS, TrainSettings
from misstep.metrics.heldout import build_bbm_splits, build_gsm8k_splits
from misstep.metrics.judge_metric import Thresholds
from misstep.optimize.compile import NothingToTrainOn
from misstep.optimize.config import RunConfig, write_config
from misstep.optimize.control import LOSSES, ControlRun, publish, run_control
from misstep.optimize.demos import ground_truth_demos, questions_of
from misstep.optimize.jobs import JobSettings, evaluate, generate, labelled_chains
from misstep.optimize.report import write_report
from misstep.optimize.rounds import run_loop
from misstep.optimize.sources import InjectedTraces
from misstep.options import DATA, SERVING, TRAINING, configured
from misstep.shown import console, show_compile, show_evaluation, show_generation

app = typer.Typer(
    help="Teach a local language model to find and recover from reasoning errors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[str, typer.Option(help=f"registered model ({', '.join(REGISTRY)}) or a local HF model folder")]
ThreadsOption = Annotated[int, typer.Option(min=1, help="concurrent requests (the engine batches them)")]
DemoDataOption = Annotated[
    Path | None, typer.Option(help="valid GSM8K chains for demos (default: shipped train sample)")
]
RunDirOption = Annotated[Path | None, typer.Option(help="where results go; rerun with the same one to resume")]
SplitsOption = Annotated[
    Path | None,
    typer.Option(
        help="folder of held-out split files (<set>-test.jsonl, "
        "<set>-validation.jsonl; default: the committed ones, "
        "built by `misstep splits`)"
    ),
]


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _load(path: Path, reports: dict[str, LoadReport] | None = None, fields: Fields | None = None):
    """The chains of a data file (its records' fields named by `fields`, for a user's --data); `reports`
    (if given) learns what the file gave and what it could not."""
    report = LoadReport()
    try:
        chains = load_chains(path, report=report, fields=fields)
    except (DataFileError, ValueError) as exc:
        _fail(str(exc))
    if reports is not None:
        reports[str(path)] = report
    return chains


def _fields(config: RunConfig, given) -> Fields | None:
    """The field names of --data files the user gave; the shipped samples are GSM8K's own."""
    return config.data if given else None


def _write_data_report(reports: dict[str, LoadReport], run_dir: Path) -> None:
    """RUN_DIR/data_report.json, and a line for each file that had records it could not use."""
    write_json_atomic(run_dir / "data_report.json", {path: r.to_dict() for path, r in reports.items()})
    for path, report in reports.items():
        if report.skipped:
            skipped = ", ".join(
                f"{n} {reason} (e.g. line {report.example_line[reason]})" for reason, n in report.skipped.items()
            )
            console.print(f"{path}: used {report.loaded}; skipped {skipped}")


def _split_chains(folder: Path | None, set_name: str, split: str, limit: int | None = None):
    """The labelled chains of one committed held-out split (its first `limit` items)."""
    try:
        items = load_split(split_path(set_name, split, folder))
    except DataFileError as exc:
        _fail(str(exc))
    return [item.chain for item in items][:limit]


def _run_dir(run_dir: Path | None, job: str) -> Path:
    return run_dir or Path("runs") / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"


def _demos(k: int, demo_data: Path | None, seed: int, exclude: set[str], heldout=()):
    if not k:
        return {}
    chains = [
        c
        for c in without_heldout(_load(demo_data or sample_path("gsm8k/train.jsonl")), list(heldout))
        if c.source_id not in exclude
    ]
    return ground_truth_demos(chains, k=k, seed=seed)


def _model_dir(model: str) -> Path:
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # one "truncated" warning per answer drowns the bar
    try:
        return resolve_model(model)
    except ModelNotFoundError as exc:
        _fail(str(exc))


def _lm(config: RunConfig, temperature: float):
    # Each stage sets its own answer budget (misstep.programs.stage.STAGE_MAX_TOKENS).
    return local_lm(
        _model_dir(config.model), engine_settings=config.engine, temperature=temperature, seed=config.loop.seed
    )


@app.command("generate")
@configured("error_type", "model", "threads", "demos", "seed", *DATA)
def generate_command(
    config: RunConfig,
    data: Annotated[Path | None, typer.Option(help="valid chains (GSM8K JSONL); default: shipped train sample")] = None,
    chains: Annotated[int, typer.Option(min=1, help="how many chains to run the cycle over")] = 8,
    run_dir: RunDirOption = None,
    demo_data: DemoDataOption = None,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
) -> None:
    """Run all six stages over N valid chains; write the scenarios and a summary into a run directory."""
    types, seed, threads = config.loop.error_types, config.loop.seed, config.loop.num_threads
    loaded = [c for c in _load(data or sample_path("gsm8k/train.jsonl"), fields=_fields(config, data)) if c.is_valid]
    demo_chains = _demos(config.loop.demos, demo_data, seed, exclude=set())
    used_for_demos = questions_of(demo_chains)
    selected = [c for c in loaded if c.question not in used_for_demos][:chains]
    if not selected:
        _fail("no valid chains to start from in the data")
    settings = JobSettings(run_dir=_run_dir(run_dir, "generate"), num_threads=threads, demos=demo_chains, seed=seed)
    console.print(f"generate: {len(selected)} chains, error types {', '.join(types)} -> {settings.run_dir}")
    summary = generate(selected, types, _lm(config, temperature), settings)
    show_generation(summary, settings.run_dir)


@app.command("evaluate")
@configured("model", "threads", "demos", "seed", *DATA)
def evaluate_command(
    config: RunConfig,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="labelled chains: BIG-Bench Mistake JSONL, or GSM8K (labelled by the injector); "
            "repeatable; default: the shipped samples"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many chains per file")] = None,
    run_dir: RunDirOption = None,
    demo_data: DemoDataOption = None,
    recover: Annotated[bool, typer.Option(help="also recover from the labelled first error")] = True,
) -> None:
    """First-error location accuracy and recovery success, per task, with 95% intervals."""
    seed, threads = config.loop.seed, config.loop.num_threads
    paths = data or [
        sample_path(f"big-bench-mistake/{t}.jsonl")
        for t in ("logical_deduction", "multistep_arithmetic", "word_sorting")
    ] + [sample_path("gsm8k/test.jsonl")]
    reports: dict[str, LoadReport] = {}
    chains = []
    for path in paths:
        chains += labelled_chains(_load(path, reports, _fields(config, data)), limit, seed, report=reports[str(path)])
    if not chains:
        _fail("no labelled chains in the data: " + "; ".join(f"{p}: {r.why_nothing()}" for p, r in reports.items()))
    run_dir = _run_dir(run_dir, "evaluate")
    settings = JobSettings(
        run_dir=run_dir,
        num_threads=threads,
        demos=_demos(config.loop.demos, demo_data, seed, exclude={c.source_id for c in chains}, heldout=chains),
        seed=seed,
    )
    with RunLock(run_dir):  # one process at a time writes a run directory
        _write_data_report(reports, run_dir)
        console.print(f"evaluate: {len(chains)} labelled chains from {len(paths)} file(s) -> {settings.run_dir}")
        metrics = evaluate(chains, _lm(config, 0.0), settings, recover=recover)
    show_evaluation(metrics, settings.run_dir)


@app.command("compile")
@configured("model", "threads", "demos", "seed", "ground_truth", *DATA, *TRAINING, *SERVING)
def compile_command(
    config: RunConfig,
    data: Annotated[
        Path | None,
        typer.Option(help="valid GSM8K chains to train on, corrupted by the injector (default: shipped train sample)"),
    ] = None,
    train_size: Annotated[int, typer.Option(min=1, help="training examples (invalid chains) to trace")] = 32,
    warm_up_first: Annotated[
        bool,
        typer.Option(
            "--warm-up/--no-warm-up",
            help="first fine-tune on the ground truth alone, so the student's own traces parse",
        ),
    ] = False,
    metric: Annotated[
        str,
        typer.Option(help="which traces to keep: judge (stages 5-6 on the frozen base model) or oracle (ground truth)"),
    ] = "judge",
    judge_warm_up: Annotated[
        bool,
        typer.Option(
            "--judge-warm-up/--no-judge-warm-up",
            help="give the judge its own "
            "weights: the base model fine-tuned on the ground truth's judge and "
            "curation examples alone (the 135M base model cannot answer in the "
            "judge's fields)",
        ),
    ] = False,
    heldout: Annotated[Path | None, typer.Option(help="held-out GSM8K chains (default: shipped test sample)")] = None,
    heldout_size: Annotated[int, typer.Option(min=1, help="held-out examples for before/after accuracy")] = 20,
    run_dir: RunDirOption = None,
    demo_data: DemoDataOption = None,
    min_confidence: Annotated[float, typer.Option(min=0.0, max=1.0, help="judge confidence to keep a trace")] = 0.5,
    min_quality: Annotated[float, typer.Option(min=0.0, max=1.0, help="curation quality to keep a trace")] = 0.5,
) -> None:
    """Compile the self-corrector into new weights (BootstrapFinetune, the judge as metric): one round of
    the loop, fed by the injector instead of the writer; print held-out location accuracy and recovery
    success before and after. Rerun with the same --run-dir to resume: finished steps are not repeated."""
    if metric == "oracle" and judge_warm_up:
        _fail("--judge-warm-up trains a judge that --metric oracle never asks: choose one")
    _check_serving(config)
    settings = replace(config.loop, rounds=1, warm_up=warm_up_first, judge_warm_up=judge_warm_up)
    if (settings.warm_up or settings.judge_warm_up) and not settings.ground_truth:
        _fail("--warm-up and --judge-warm-up need ground truth to train on: set --ground-truth above 0")
    try:
        source = InjectedTraces(train_size, metric, Thresholds(min_confidence, min_quality))
    except ValueError as exc:
        _fail(str(exc))
    heldout_source = _load(heldout or sample_path("gsm8k/test.jsonl"), fields=_fields(config, heldout))
    heldout_chains = labelled_chains(heldout_source, heldout_size, settings.seed)
    # No question of the held-out file (measured or not) reaches a demo, the ground truth or a trace.
    train_chains = without_heldout(
        _load(data or sample_path("gsm8k/train.jsonl"), fields=_fields(config, data)), heldout_source
    )
    demo_chains = without_heldout(_load(demo_data), heldout_source) if demo_data else None
    run = _run_dir(run_dir, "compile")
    with RunLock(run):  # one process at a time writes a run directory
        write_config(config, run / "config.toml")
        provider = _provider(config, run)
        console.print(f"compile: {train_size} training examples, {len(heldout_chains)} held out -> {run}")
        try:
            history = run_loop(
                train_chains,
                {"gsm8k": heldout_chains},
                provider=provider,
                judge_lm=provider.lm(seed=settings.seed).copy(provider=None),
                settings=settings,
                run_dir=run,
                source=source,
                demo_chains=demo_chains,
            )
        except NothingToTrainOn as exc:
            _fail(str(exc))
        finally:
            provider.close()
    show_compile(history, settings.warm_up, run, report=write_report(run))


def _check_serving(config: RunConfig) -> None:
    if config.serving == "vllm" and not vllm_available(config.vllm.python):
        _fail(
            f"--engine vllm: {config.vllm.python} cannot import vllm; install it with `bash scripts/install.sh "
            "--vllm` or point --vllm-python at a Python that has it"
        )


def _provider(config: RunConfig, run: Path) -> LocalProvider:
    return LocalProvider(
        _model_dir(config.model),
        run / "checkpoints",
        config.train,
        serving=config.serving,
        vllm=config.vllm,
        engine=config.engine,
    )


@app.command("optimize")
@configured(
    "rounds",
    "seed_chains",
    "error_type",
    "ground_truth",
    "warm_up",
    "judge_warm_up",
    "active",
    "trials",
    "patience",
    "model",
    "threads",
    "demos",
    "seed",
    *DATA,
    *TRAINING,
    *SERVING,
)
def optimize_command(
    config: RunConfig,
    data: Annotated[
        Path | None,
        typer.Option(
            help="valid GSM8K chains the loop draws seeds and ground truth from (default: shipped train sample)"
        ),
    ] = None,
    splits: SplitsOption = None,
    heldout_size: Annotated[
        int | None, typer.Option(min=1, help="measure only the first N items of each split (a quick run; default: all)")
    ] = None,
    bbm: Annotated[
        list[str] | None,
        typer.Option(
            help="BIG-Bench Mistake task measured each round (repeat): "
            "word_sorting, multistep_arithmetic, logical_deduction"
        ),
    ] = None,
    run_dir: RunDirOption = None,
) -> None:
    """The self-improvement loop: each round the model writes scenarios, the frozen judge scores
    them, Optuna-tuned thresholds keep some, the student is compiled on everything kept so far,
    and held-out accuracy decides whether to go on. Rerun with the same --run-dir to resume."""
    _check_serving(config)
    train_chains = _load(data or sample_path("gsm8k/train.jsonl"), fields=_fields(config, data))
    held, validation = (
        {
            name: _split_chains(splits, set_name, split, heldout_size)
            for name, set_name in [("gsm8k", "gsm8k")] + [(f"bbm-{t}", t) for t in bbm or []]
        }
        for split in ("test", "validation")
    )
    settings = config.loop
    run = _run_dir(run_dir, "optimize")
    with RunLock(run):  # one process at a time writes a run directory
        write_config(config, run / "config.toml")
        provider = _provider(config, run)
        judge_lm = provider.lm(seed=settings.seed).copy(provider=None)  # the frozen judge
        console.print(
            f"optimize: {settings.rounds} rounds of {settings.seed_chains} seed chains, held out (test) "
            f"{', '.join(f'{k} {len(v)}' for k, v in held.items())}, chosen on (validation) "
            f"{', '.join(f'{k} {len(v)}' for k, v in validation.items())} -> {run}"
        )
        try:
            history = run_loop(
                train_chains,
                held,
                provider=provider,
                judge_lm=judge_lm,
                settings=settings,
                run_dir=run,
                validation=validation,
            )
        finally:
            provider.close()
        report = write_report(run)
        console.print(f"{history[-1]['verdict']['reason']}: {history[-1]['verdict']['detail']}")
        console.print(f"report: {report}")


@app.command("splits")
def splits_command(
    gsm8k: Annotated[Path, typer.Option(help="GSM8K test solutions the GSM8K splits are built from")] = Path(
        "../shared/data/gsm8k/test.jsonl"
    ),
    bbm: Annotated[
        list[Path] | None,
        typer.Option(
            help="BIG-Bench Mistake task files (repeat); default: every .jsonl beside --gsm8k's ../big-bench-mistake"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="where the split files go")] = Path("data/splits"),
    seed: int = 0,
) -> None:
    """Build the held-out splits (test and validation, disjoint) as item lists: OUT/<set>-<split>.jsonl."""
    bbm = bbm or sorted((gsm8k.parent.parent / "big-bench-mistake").glob("*.jsonl"))
    try:
        built = {"gsm8k": build_gsm8k_splits(gsm8k, seed=seed)}
        built |= {path.stem: build_bbm_splits(path, seed=seed) for path in bbm}
    except (DataFileError, ValueError) as exc:
        _fail(str(exc))
    table = Table("set", "split", "items", "no mistake", "file")
    for name, splits in built.items():
        for split, items in splits.items():
            path = out / f"{name}-{split}.jsonl"
            save_split(path, items)
            table.add_row(
                name, split, str(len(items)), str(sum(i.chain.mistake_index is None for i in items)), str(path)
            )
    console.print(table)


@app.command("control")
def control_command(
    data: Annotated[Path, typer.Option(help="valid GSM8K chains to train on, labelled by the injector")] = Path(
        "../shared/data/gsm8k/train.jsonl"
    ),
    split: Annotated[
        Path,
        typer.Option(
            help="the held-out split to measure on (choose settings on gsm8k-validation.jsonl; report on test)"
        ),
    ] = Path("data/splits/gsm8k-test.jsonl"),
    sizes: Annotated[list[int] | None, typer.Option("--size", min=1, help="stage-3 training chains (repeat)")] = None,
    cue: Annotated[
        list[str] | None, typer.Option(help="'cue' (the first error marked), 'real', or both (repeat)")
    ] = None,
    learning_rate: Annotated[list[float] | None, typer.Option(help="full fine-tune learning rate (repeat)")] = None,
    epochs: Annotated[list[float] | None, typer.Option(min=0.01, help="(repeat)")] = None,
    loss: Annotated[
        list[str] | None,
        typer.Option(
            help="stage3 (stage-3 records alone) or all (with the other "
            "stages' ground truth, as the loop trains) (repeat)"
        ),
    ] = None,
    adam_beta2: Annotated[
        list[float] | None,
        typer.Option(min=0.5, max=0.9999, help="AdamW's second-moment decay (repeat; default 0.999)"),
    ] = None,
    loss_weighting: Annotated[
        list[str] | None,
        typer.Option(
            help="tokens (one mean over the answer tokens) or "
            "fields (each field's value weighs as much as all "
            "markers) (repeat; default tokens)"
        ),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    run_dir: Annotated[Path, typer.Option(help="one folder per run; rerun to resume")] = Path("runs/control"),
    results: Annotated[
        Path | None,
        typer.Option(
            help="also record every finished run here (JSON; its predictions "
            "and slices beside it), e.g. docs/results/control.json"
        ),
    ] = None,
    threads: ThreadsOption = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    max_length: Annotated[int, typer.Option(min=16, help="training sequence length in tokens")] = 1024,
    seed: int = 0,
) -> None:
    """The positive control: fine-tune stage 3 alone on injector-labelled chains (first errors
    balanced across steps, 15% valid), measure location on a held-out split beside the majority
    and last-step baselines. Every combination of the repeated options is one run; finished runs
    are skipped, a killed one resumes."""
    modes = cue or ["cue", "real"]
    if set(modes) - {"cue", "real"}:
        _fail(f"--cue takes 'cue' or 'real', not {sorted(set(modes) - {'cue', 'real'})}")
    losses = loss or ["stage3"]
    if set(losses) - set(LOSSES):
        _fail(f"--loss takes {' or '.join(LOSSES)}, not {sorted(set(losses) - set(LOSSES))}")
    weightings = loss_weighting or ["tokens"]
    if set(weightings) - set(LOSS_WEIGHTINGS):
        _fail(
            f"--loss-weighting takes {' or '.join(LOSS_WEIGHTINGS)}, "
            f"not {sorted(set(weightings) - set(LOSS_WEIGHTINGS))}"
        )
    try:
        items = load_split(split)
    except DataFileError as exc:
        _fail(str(exc))
    # Training never sees a question of either committed split, whichever is measured here.
    committed = [item.chain for name in ("test", "validation") for item in load_split(split_path("gsm8k", name))]
    pool = without_heldout(_load(data), committed)
    model_dir = _model_dir(model)
    runs = [
        ControlRun(n, mode == "cue", lr, e, loss_kind, seed, b2, w)
        for n in sizes or [1000]
        for mode in modes
        for lr in learning_rate or [1e-4]
        for e in epochs or [1.0]
        for loss_kind in losses
        for b2 in adam_beta2 or [0.999]
        for w in weightings
    ]
    settings = TrainSettings(method="full", batch_size=batch_size, max_length=max_length, seed=seed)
    for number, run in enumerate(runs, start=1):
        console.print(f"[bold]run {number}/{len(runs)}: {run.name}[/bold]")
        try:
            result = run_control(
                run, pool, items, model_dir=model_dir, run_dir=run_dir, settings=settings, num_threads=threads
            )
        except (ValueError, RunDirBusy) as exc:
            _fail(f"{run.name}: {exc}")
        console.print(
            f"  {result['correct']}/{result['heldout_n']} correct; majority baseline "
            f"{result['majority_baseline_correct']}, last step {result['last_step_baseline_correct']}; "
            f"McNemar p against the better: {result['mcnemar_p']:.3g}"
        )
        if results:
            publish(result, items, results)


@app.command("report")
def report_command(run_dir: Annotated[Path, typer.Argument(help="an optimize run directory")]) -> None:
    """Write RUN_DIR/report.md with plots from a loop's files (nothing is run)."""
    try:
        path = write_report(run_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    console.print(f"report: {path}")


@app.command("models")
def models_command(
    prepare: Annotated[str | None, typer.Option(help="convert this registered model now (else on first use)")] = None,
) -> None:
    """List the registered base models, or convert one into the cache."""
    if prepare:
        try:
            console.print(f"{prepare}: {resolve_model(prepare)}")
        except ModelNotFoundError as exc:
            _fail(str(exc))
        return
    for name, spec in REGISTRY.items():
        console.print(f"{name}: {spec.gguf_file} from the '{spec.package}' package ({spec.install_hint})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
