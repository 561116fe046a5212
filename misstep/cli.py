"""The `misstep` command line: each command parses its options into settings and calls one function
of misstep.optimize. What the options are lives in misstep/options.py; what a command reads
before it runs (data, splits, the model) in misstep/inputs.py; what it prints in misstep/shown.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from misstep import inputs
from misstep import options as opt
from misstep.data import DataFileError
from misstep.data.procedural import LADDER
from misstep.data.runfiles import RunLock
from misstep.data.splits import save_splits, split_path, without_heldout
from misstep.inputs import Refused
from misstep.lm import DEFAULT_MODEL, REGISTRY
from misstep.lm.training import TrainSettings
from misstep.metrics.heldout import build_bbm_splits, build_gsm8k_splits, build_level_splits
from misstep.metrics.judge_metric import Thresholds
from misstep.optimize.config import RunConfig
from misstep.optimize.control import control_grid, procedural_training_pool, publish, run_control, training_pool
from misstep.optimize.demos import questions_of
from misstep.optimize.jobs import JobSettings, evaluate, generate, labelled_chains
from misstep.optimize.report import write_report
from misstep.optimize.run import arm_variants, named_arms, run_arms, run_rounds
from misstep.optimize.sources import InjectedTraces
from misstep.options import COMMON, DATA, LOOP, SERVING, TRAINING, configured, refusing
from misstep.shown import console, show_compile, show_control_run, show_evaluation, show_generation, show_splits

app = typer.Typer(
    help="Teach a local language model to find and recover from reasoning errors.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.command("generate")
@configured("error_type", *COMMON, *DATA)
def generate_command(
    config: RunConfig,
    data: opt.GenerateData = None,
    chains: opt.Chains = 8,
    run_dir: opt.RunDir = None,
    demo_data: opt.DemoData = None,
    temperature: opt.Temperature = 0.0,
) -> None:
    """Run all six stages over N valid chains; write the scenarios and a summary into a run directory."""
    loop = config.loop
    demos = inputs.demos_for(loop.demos, demo_data, loop.seed, exclude=set())
    used_for_demos = questions_of(demos)
    valid = [c for c in inputs.chains_of(data, fields=inputs.user_fields(config, data)) if c.is_valid]
    selected = [c for c in valid if c.question not in used_for_demos][:chains]
    if not selected:
        raise Refused("no valid chains to start from in the data")
    settings = JobSettings(
        inputs.run_dir_for(run_dir, "generate"), loop.num_threads, demos, loop.seed, loop.constrained
    )
    console.print(f"generate: {len(selected)} chains, error types {', '.join(loop.error_types)} -> {settings.run_dir}")
    summary = generate(selected, loop.error_types, inputs.student_lm(config, temperature), settings)
    show_generation(summary, settings.run_dir)


@app.command("evaluate")
@configured(*COMMON, *DATA)
def evaluate_command(
    config: RunConfig,
    data: opt.EvaluateData = None,
    limit: opt.PerFile = None,
    run_dir: opt.RunDir = None,
    demo_data: opt.DemoData = None,
    recover: opt.Recover = True,
) -> None:
    """First-error location accuracy and recovery success, per task, with 95% intervals."""
    seed = config.loop.seed
    chains, reports = inputs.labelled(data, inputs.user_fields(config, data), limit, seed)
    demos = inputs.demos_for(config.loop.demos, demo_data, seed, exclude={c.source_id for c in chains}, heldout=chains)
    loop = config.loop
    settings = JobSettings(inputs.run_dir_for(run_dir, "evaluate"), loop.num_threads, demos, seed, loop.constrained)
    with RunLock(settings.run_dir):  # one process at a time writes a run directory
        inputs.write_data_report(reports, settings.run_dir)
        console.print(f"evaluate: {len(chains)} labelled chains from {len(reports)} file(s) -> {settings.run_dir}")
        metrics = evaluate(chains, inputs.student_lm(config, 0.0), settings, recover=recover)
    show_evaluation(metrics, settings.run_dir)


@app.command("compile")
@configured("ground_truth", *COMMON, *DATA, *TRAINING, *SERVING)
def compile_command(
    config: RunConfig,
    data: opt.CompileData = None,
    train_size: opt.TrainSize = 32,
    warm_up_first: opt.WarmUpFirst = False,
    metric: opt.Metric = "judge",
    judge_warm_up: opt.JudgeWarmUp = False,
    heldout: opt.Heldout = None,
    heldout_size: opt.HeldoutSize = 20,
    run_dir: opt.RunDir = None,
    demo_data: opt.DemoData = None,
    min_confidence: opt.MinConfidence = 0.5,
    min_quality: opt.MinQuality = 0.5,
) -> None:
    """Compile the self-corrector into new weights (BootstrapFinetune, the judge as metric): one round of
    the loop, fed by the injector instead of the writer; print held-out location accuracy and recovery
    success before and after. Rerun with the same --run-dir to resume: finished steps are not repeated."""
    if metric == "oracle" and judge_warm_up:
        raise Refused("--judge-warm-up trains a judge that --metric oracle never asks: choose one")
    # One round fed by the injector: no written scenarios, so no verification set is reserved for the
    # generation-verification gap (the loop's, across rounds).
    loop = replace(config.loop, rounds=1, warm_up=warm_up_first, judge_warm_up=judge_warm_up, verification_chains=0)
    config = replace(config, loop=loop)
    if (warm_up_first or judge_warm_up) and not config.loop.ground_truth:
        raise Refused("--warm-up and --judge-warm-up need ground truth to train on: set --ground-truth above 0")
    try:
        source = InjectedTraces(train_size, metric, Thresholds(min_confidence, min_quality))
    except ValueError as exc:
        raise Refused(str(exc)) from None
    inputs.check_serving(config)
    heldout_file = inputs.chains_of(heldout, inputs.TEST_SAMPLE, fields=inputs.user_fields(config, heldout))
    heldout_chains = labelled_chains(heldout_file, heldout_size, config.loop.seed)
    # No question of the held-out file (measured or not) reaches a demo, the ground truth or a trace.
    train_chains = without_heldout(inputs.chains_of(data, fields=inputs.user_fields(config, data)), heldout_file)
    demo_chains = without_heldout(inputs.chains_of(demo_data), heldout_file) if demo_data else None
    run = inputs.run_dir_for(run_dir, "compile")
    console.print(f"compile: {train_size} training examples, {len(heldout_chains)} held out -> {run}")
    model, held = inputs.model_dir(config.model), {"gsm8k": heldout_chains}
    history, report = run_rounds(config, model, train_chains, held, run_dir=run, source=source, demo_chains=demo_chains)
    show_compile(history, warm_up_first, run, report=report)


@app.command("optimize")
@configured(*LOOP, *COMMON, *DATA, *TRAINING, *SERVING)
def optimize_command(
    config: RunConfig,
    data: opt.OptimizeData = None,
    splits: opt.Splits = None,
    heldout_size: opt.SplitLimit = None,
    bbm: opt.BbmTasks = None,
    bbm_at_best: opt.BbmAtBest = None,
    level: opt.LevelSets = None,
    keep: opt.Keep = None,
    seed_mode: opt.SeedModes = None,
    arm: opt.Arms = None,
    run_dir: opt.RunDir = None,
) -> None:
    """The self-improvement loop: each round the model writes scenarios, the frozen judge scores
    them under Optuna-tuned thresholds, the round's arm (--keep) admits some of the student's own
    answers, the student is compiled on everything kept so far, and held-out accuracy decides
    whether to go on. Several --keep arms (or --arm, by name) run side by side from one round 0 and
    are compared in RUN_DIR/arms.md. Rerun with the same --run-dir to resume."""
    inputs.check_serving(config)
    train_chains = inputs.chains_of(data, fields=inputs.user_fields(config, data))
    sets = [("gsm8k", "gsm8k")] + [(f"bbm-{t}", t) for t in bbm or []] + [(f"level-{k}",) * 2 for k in level or []]
    test, validation = (
        {name: inputs.split_chains(splits, set_name, split, heldout_size) for name, set_name in sets}
        for split in ("test", "validation")
    )
    run = inputs.run_dir_for(run_dir, "optimize")
    console.print(
        f"optimize: {config.loop.rounds} rounds of {config.loop.seed_chains} seed chains, held out (test) "
        f"{', '.join(f'{k} {len(v)}' for k, v in test.items())}, chosen on (validation) "
        f"{', '.join(f'{k} {len(v)}' for k, v in validation.items())} -> {run}"
    )
    if arm and (keep or seed_mode):
        raise Refused("--arm names each arm whole (<keep>-<seed mode>): give it without --keep and --seed-mode")
    keeps = [str(k) for k in keep or [config.loop.keep]]
    modes = [str(mode) for mode in seed_mode or []] or None
    try:
        if arm:
            arms = named_arms(config.loop, list(arm), config.arms)
        else:
            arms = arm_variants(config.loop, keeps, modes, config.arms)
    except ValueError as exc:
        raise Refused(f"--arm: {exc}" if arm else f"--keep, --seed-mode: {exc}") from None
    at_best = {f"bbm-{t}": inputs.split_chains(splits, t, "test", heldout_size) for t in bbm_at_best or []}
    if at_best and len(arms) < 2:
        raise Refused(
            "--bbm-at-best measures side-by-side arms' best rounds: give two --keep arms, seed modes or --arm"
        )
    if len(arms) > 1:
        histories, report = run_arms(
            config,
            inputs.model_dir(config.model),
            train_chains,
            test,
            arms=arms,
            run_dir=run,
            validation=validation,
            at_best=at_best,
        )
        for name, history in histories.items():
            console.print(f"{name}: {history[-1]['verdict']['reason']}: {history[-1]['verdict']['detail']}")
        return console.print(f"arms compared: {report}")
    (only,) = arms.values()
    if keep or seed_mode or arm:  # as given; otherwise the configuration's own (active selection included)
        config = replace(config, loop=replace(only, active_selection=config.loop.active_selection))
    history, report = run_rounds(
        config, inputs.model_dir(config.model), train_chains, test, run_dir=run, validation=validation
    )
    console.print(f"{history[-1]['verdict']['reason']}: {history[-1]['verdict']['detail']}")
    console.print(f"report: {report}")


@app.command("splits")
@refusing
def splits_command(
    gsm8k: opt.SplitsGsm8k = Path("../shared/data/gsm8k/test.jsonl"),
    bbm: opt.SplitsBbm = None,
    out: opt.SplitsOut = Path("data/splits"),
    seed: int = 0,
) -> None:
    """Build the held-out splits (test and validation, disjoint) as item lists: OUT/<set>-<split>.jsonl,
    for GSM8K, each BIG-Bench Mistake task and each difficulty level of the procedural problems."""
    bbm = bbm or sorted((gsm8k.parent.parent / "big-bench-mistake").glob("*.jsonl"))
    try:
        built = {"gsm8k": build_gsm8k_splits(gsm8k, seed=seed)}
        built |= {path.stem: build_bbm_splits(path, seed=seed) for path in bbm}
    except (DataFileError, ValueError) as exc:
        raise Refused(str(exc)) from None
    built |= {f"level-{d.level}": build_level_splits(d) for d in LADDER}  # made, not read: the same each time
    save_splits(built, out)
    show_splits(built, out)


@app.command("control")
@refusing
def control_command(
    data: opt.ControlData = Path("../shared/data/gsm8k/train.jsonl"),
    split: opt.ControlSplit = None,
    sizes: opt.ControlSizes = None,
    cue: opt.ControlCue = None,
    learning_rate: opt.ControlLearningRates = None,
    epochs: opt.ControlEpochs = None,
    loss: opt.ControlLoss = None,
    adam_beta2: opt.ControlBeta2 = None,
    loss_weighting: opt.ControlWeighting = None,
    positions: opt.ControlPositions = None,
    level: opt.ControlLevel = None,
    lora_rank: opt.ControlLoraRank = None,
    error_type: opt.ControlErrorType = None,
    model: opt.Model = DEFAULT_MODEL,
    run_dir: opt.ControlRunDir = Path("runs/control"),
    results: opt.ControlResults = None,
    threads: opt.Threads = 8,
    batch_size: opt.BatchSize = 4,
    max_length: opt.MaxLength = 1024,
    seed: int = 0,
    constrained: opt.ControlConstrained = False,
) -> None:
    """The positive control: fine-tune stage 3 alone on injector-labelled chains (first errors
    placed by --positions, 15% valid), measure location on a held-out split beside the majority
    and last-step baselines. Every combination of the repeated options is one run; finished runs
    are skipped, a killed one resumes."""
    runs = control_grid(
        sizes=sizes,
        modes=cue,
        learning_rates=learning_rate,
        epochs=epochs,
        losses=loss,
        adam_beta2s=adam_beta2,
        loss_weightings=loss_weighting,
        seed=seed,
        positions=positions,
        level=level,
        lora_rank=lora_rank,
        error_type=error_type,
    )
    items = inputs.split_items(split or split_path("gsm8k" if level is None else f"level-{level}", "test"))
    if level is None:
        pool = training_pool(inputs.chains_of(data))
    else:  # enough distinct problems for the largest run's valid and injected chains
        try:
            pool = procedural_training_pool(level, 3 * max(run.train_records for run in runs), seed=seed)
        except ValueError as exc:
            raise Refused(f"--level: {exc}") from None
    settings = TrainSettings(method="full", batch_size=batch_size, max_length=max_length, seed=seed)
    common = dict(
        model_dir=inputs.model_dir(model),
        run_dir=run_dir,
        settings=settings,
        num_threads=threads,
        constrained=constrained,
    )
    for number, run in enumerate(runs, start=1):
        console.print(f"[bold]run {number}/{len(runs)}: {run.name}[/bold]")
        try:
            result = run_control(run, pool, items, **common)
        except ValueError as exc:
            raise Refused(f"{run.name}: {exc}") from None
        show_control_run(result)
        if results:
            publish(result, items, results)


@app.command("report")
@refusing
def report_command(run_dir: Annotated[Path, typer.Argument(help="an optimize run directory")]) -> None:
    """Write RUN_DIR/report.md with plots from a loop's files (nothing is run)."""
    try:
        console.print(f"report: {write_report(run_dir)}")
    except FileNotFoundError as exc:
        raise Refused(str(exc)) from None


@app.command("models")
@refusing
def models_command(prepare: opt.Prepare = None) -> None:
    """List the registered base models, or convert one into the cache."""
    if prepare:
        return console.print(f"{prepare}: {inputs.model_dir(prepare)}")
    for name, spec in REGISTRY.items():
        console.print(f"{name}: {spec.gguf_file} from the '{spec.package}' package ({spec.install_hint})")
