"""One run of the loop from its configuration: what `misstep optimize` and `misstep compile` both do.

    history, report = run_rounds(config, base_model, train_chains, {"gsm8k": test_chains},
                                 run_dir=Path("runs/loop"), validation={"gsm8k": validation_chains})

`compile` is the same call with `config.loop.rounds == 1` and an `InjectedTraces` source;
`run_arms` runs several arms (`LoopSettings.keep`) from one shared start.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from misstep.data.records import Chain
from misstep.data.runfiles import holds_run_dir
from misstep.lm.provider import LocalProvider
from misstep.optimize.arms_report import arm_dir, write_arms_report
from misstep.optimize.config import RunConfig, write_config
from misstep.optimize.report import write_report
from misstep.optimize.rounds import run_loop
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
    write_config(config, run_dir / "config.toml")
    provider = _provider(config, base_model, run_dir)
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


@holds_run_dir(lambda args: args["run_dir"])
def run_arms(
    config: RunConfig,
    base_model: Path,
    train_chains: list[Chain],
    heldout: dict[str, list[Chain]],
    *,
    arms: list[str],
    run_dir: Path,
    validation: dict[str, list[Chain]] | None = None,
    demo_chains: list[Chain] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], Path]:
    """Run (or resume) the loop once per arm, all from one start: the judge and round 0 are made once
    in RUN_DIR, each arm's rounds go under RUN_DIR/arm-<arm>/. Round r of every arm runs before round
    r + 1 of any, so an interrupted run leaves the arms on paired rounds; an arm whose stop rule
    stops it runs no further. Every arm draws its seed chains uniformly with the same seed, so all
    arms write from the same chains each round. Writes each arm's report.md and RUN_DIR/arms.md.
    Return each arm's history and the comparison's path."""
    if len(set(arms)) != len(arms) or not arms:
        raise ValueError(f"arms must be distinct and at least one, not {arms}")
    loop = replace(config.loop, active_selection=False)  # the same seed chains for every arm
    write_config(replace(config, loop=loop), run_dir / "config.toml")
    provider = _provider(config, base_model, run_dir)
    histories: dict[str, list[dict[str, Any]]] = {}
    try:
        judge_lm = provider.lm(seed=loop.seed).copy(provider=None)  # the frozen judge, shared
        for r in range(1, loop.rounds + 1):
            for arm in arms:
                if arm in histories and histories[arm][-1]["verdict"]["stop"]:
                    continue
                histories[arm] = run_loop(
                    train_chains,
                    heldout,
                    provider=provider,
                    judge_lm=judge_lm,
                    settings=replace(loop, keep=arm, rounds=r),
                    run_dir=arm_dir(run_dir, arm),
                    validation=validation,
                    demo_chains=demo_chains,
                    start_dir=run_dir,
                )
    finally:
        provider.close()
    for arm in arms:
        write_report(arm_dir(run_dir, arm))
    return histories, write_arms_report(run_dir, arms)


def _provider(config: RunConfig, base_model: Path, run_dir: Path) -> LocalProvider:
    return LocalProvider(
        base_model,
        run_dir / "checkpoints",
        config.train,
        serving=config.serving,
        vllm=config.vllm,
        engine=config.engine,
    )
