"""One run of the loop from its configuration: what `misstep optimize` and `misstep compile` both do.

    history, report = run_rounds(config, base_model, train_chains, {"gsm8k": test_chains},
                                 run_dir=Path("runs/loop"), validation={"gsm8k": validation_chains})

`compile` is the same call with `config.loop.rounds == 1` and an `InjectedTraces` source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from misstep.data.records import Chain
from misstep.data.runfiles import holds_run_dir
from misstep.lm.provider import LocalProvider
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
    provider = LocalProvider(
        base_model,
        run_dir / "checkpoints",
        config.train,
        serving=config.serving,
        vllm=config.vllm,
        engine=config.engine,
    )
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
