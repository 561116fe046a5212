"""One run of the loop from its configuration: what `misstep optimize` and `misstep compile` both do.

    history, report = run_rounds(config, base_model, train_chains, {"gsm8k": test_chains},
                                 run_dir=Path("runs/loop"), validation={"gsm8k": validation_chains})

`compile` is the same call with `config.loop.rounds == 1` and an `InjectedTraces` source;
`run_arms` runs several arms (`LoopSettings.keep`) from one shared start.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from misstep.data.records import Chain
from misstep.data.runfiles import holds_run_dir
from misstep.lm.client import release
from misstep.lm.provider import LocalProvider
from misstep.optimize.arms_report import AT_BEST, arm_dir, round_folder, write_arms_report
from misstep.optimize.compile import load_compiled
from misstep.optimize.config import RunConfig, apply, write_config
from misstep.optimize.report import write_report
from misstep.optimize.rounds import measure, refuse_another_judge, run_loop
from misstep.optimize.settings import SEED_MODES, LoopSettings, arm_parts, each_once
from misstep.optimize.sources import RoundSource


@holds_run_dir(lambda args: args["run_dir"])
def run_rounds(
    config: RunConfig,
    base_model: Path,
    train_chains: list[Chain],
    heldout: dict[str, list[Chain]],
    *,
    run_dir: Path,
    validation: dict[str, list[Chain]] | None = None,
    source: RoundSource | None = None,
    demo_chains: list[Chain] | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Run (or resume) the loop of `config` from the weights in `base_model`: write RUN_DIR/config.toml
    (what it ran with, readable as a --config file), the rounds (optimize/rounds.py) and report.md.
    Return the history and the report's path."""
    refuse_another_judge(run_dir, config.loop, config.train)
    write_config(config, run_dir / "config.toml")
    provider = run_provider(config, base_model, run_dir)
    try:
        history = run_loop(
            train_chains,
            heldout,
            provider=provider,
            judge_lm=provider.lm(seed=config.loop.seed).copy(provider=None),  # the frozen judge
            settings=config.loop,
            run_dir=run_dir,
            validation=validation,
            source=source,
            demo_chains=demo_chains,
        )
    finally:
        provider.close()
    return history, write_report(run_dir)


def arm_variants(
    loop: LoopSettings,
    keeps: list[str],
    seed_modes: list[str] | None = None,
    changes: dict[str, dict[str, Any]] | None = None,
) -> dict[str, LoopSettings]:
    """The loops `run_arms` runs side by side, by name: one per arm (`LoopSettings.keep`) and seed mode
    (`SEED_MODES`), each otherwise `loop` with its own `changes` (`RunConfig.arms`, by the arm's full
    name, `<keep>` or `<keep>-<seed mode>`).
    Named by what varies: the arm, the seed mode, or both ("judge-curriculum"); every one draws its
    seeds uniformly (no active selection of error types), so the arms of one seed mode write from the
    same chains each round."""
    modes = seed_modes or [None]
    unknown = sorted(set(m for m in modes if m is not None) - set(SEED_MODES))
    if unknown:
        raise ValueError(f"seed modes are {', '.join(SEED_MODES)}, not {unknown}")
    each_once(keeps, "arm")
    each_once([m for m in modes if m is not None], "seed mode")
    full_names = {}  # the name shown -> the arm's full name, as named_arms and [arms.<name>] know it
    for keep in keeps:
        for mode in modes:
            shown = keep if len(modes) == 1 else mode if len(keeps) == 1 else f"{keep}-{mode}"
            full_names[shown] = keep if mode is None else f"{keep}-{mode}"
    arms = named_arms(loop, list(full_names.values()), changes)
    return {shown: arms[name] for shown, name in full_names.items()}


def named_arms(
    loop: LoopSettings, names: list[str], changes: dict[str, dict[str, Any]] | None = None
) -> dict[str, LoopSettings]:
    """The loops `run_arms` runs side by side, each named `<keep>` (seeds as `loop` draws them) or
    `<keep>-<seed mode>` ("judge-curriculum"), each with its own `changes` (`RunConfig.arms`): any
    set of arms, where `arm_variants` makes every combination. So one run can hold the judge, oracle
    and random arms on GSM8K seeds beside the judge arm on procedural seeds, all from one round 0 and
    one judge."""
    if not names:
        raise ValueError("name at least one arm")
    each_once(names, "arm")
    return {name: _arm(loop, name, changes) for name in names}


def _arm(loop: LoopSettings, name: str, changes: dict[str, dict[str, Any]] | None) -> LoopSettings:
    """`loop` as the arm `name` (`<keep>` or `<keep>-<seed mode>`, as --arm and [arms.<name>] name
    it) runs it: its keep arm, its seed mode, no active selection, then its own table of `changes`."""
    keep, mode = arm_parts(name)
    arm = replace(loop, keep=keep, active_selection=False, **SEED_MODES.get(mode, {}))
    return apply(arm, (changes or {}).get(name, {}), f"arms.{name}.")


@holds_run_dir(lambda args: args["run_dir"])
def run_arms(
    config: RunConfig,
    base_model: Path,
    train_chains: list[Chain],
    heldout: dict[str, list[Chain]],
    *,
    arms: dict[str, LoopSettings],
    run_dir: Path,
    validation: dict[str, list[Chain]] | None = None,
    demo_chains: list[Chain] | None = None,
    at_best: dict[str, list[Chain]] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], Path]:
    """Run (or resume) the loops `arms` (by name, from `arm_variants` or `named_arms`) side by side,
    all from one start: the judge and round 0 are made once in RUN_DIR (from `config.loop`; what the
    arms vary, the arm and how seeds are drawn, does not touch round 0), each arm's rounds go under
    RUN_DIR/arm-<name>/. Round r of every arm runs before round r + 1 of any, so an interrupted run
    leaves the arms on paired rounds; an arm whose stop rule stops it runs no further. `at_best`
    (BIG-Bench Mistake, say) is measured once the arms are done, on round 0 and on each arm's best
    round only (under <round>/at-best/<set>/). Writes each arm's report.md and RUN_DIR/arms.md.
    Return each arm's history and the comparison's path."""
    if not arms:
        raise ValueError("no arm to run")
    refuse_another_judge(run_dir, config.loop, config.train)
    write_config(config, run_dir / "config.toml")
    provider = run_provider(config, base_model, run_dir)
    histories: dict[str, list[dict[str, Any]]] = {}
    try:
        judge_lm = provider.lm(seed=config.loop.seed).copy(provider=None)  # the frozen judge, shared
        for r in range(1, max(loop.rounds for loop in arms.values()) + 1):
            for name, loop in arms.items():
                if r > loop.rounds or (name in histories and histories[name][-1]["verdict"]["stop"]):
                    continue
                histories[name] = run_loop(
                    train_chains,
                    heldout,
                    provider=provider,
                    judge_lm=judge_lm,
                    settings=replace(loop, rounds=r),
                    run_dir=arm_dir(run_dir, name),
                    validation=validation,
                    demo_chains=demo_chains,
                    start_dir=run_dir,
                )
        if at_best:
            _measure_at_best(run_dir, list(arms), at_best, provider, config.loop)
    finally:
        provider.close()
    for name in arms:
        write_report(arm_dir(run_dir, name))
    return histories, write_arms_report(run_dir, list(arms))


def _measure_at_best(
    run_dir: Path, arms: list[str], sets: dict[str, list[Chain]], provider: LocalProvider, loop: LoopSettings
) -> None:
    """Round 0 and each arm's best round (its best.json) on `sets`, each round once, resumably."""
    folders = [round_folder(run_dir, arms[0], 0)]
    for arm in arms:
        best = json.loads((arm_dir(run_dir, arm) / "best.json").read_text())["round"]
        folders.append(round_folder(run_dir, arm, best))
    for folder in dict.fromkeys(folders):
        measure_saved_round(folder, {AT_BEST: sets}, provider, loop)


def measure_saved_round(
    folder: Path, measured: dict[str, dict[str, list[Chain]]], provider: LocalProvider, loop: LoopSettings
) -> dict[str, Any]:
    """A finished round (its program.json) on `measured`, written and resumed under `folder` as the
    loop writes them (`measure`); its model is released after."""
    student = load_compiled(folder / "program.json", provider=provider, max_batch_size=loop.num_threads)
    try:
        return measure(student, folder, measured, loop)
    finally:
        release(student.predictors()[0].lm)


def run_provider(config: RunConfig, base_model: Path, run_dir: Path) -> LocalProvider:
    """The provider a run of `config` trains and serves through: its checkpoints under RUN_DIR."""
    return LocalProvider(
        base_model,
        run_dir / "checkpoints",
        config.train,
        serving=config.serving,
        vllm=config.vllm,
        engine=config.engine,
    )
