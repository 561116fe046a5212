"""Optuna tunes the acceptance thresholds on a round's judged traces, against the oracle.

Scoring a candidate needs no model call: the judge's verdict, confidence, the curator's
keep and quality, and the oracle's verdict are already recorded for every trace, so a
trial only replays `Thresholds.admit` over them. That keeps tuning affordable on a CPU
(hundreds of trials in a second) where tuning through full compiles would take hours.

Two objectives, both maximized: the kept set's precision (the share the oracle says
really recovered) and its yield (the share of judged traces kept). Of the Pareto front,
the chosen trial has the highest Wilson lower bound on precision among those keeping at
least `min_yield`, so a threshold that keeps three lucky traces does not win.

The studies live in one SQLite file in the run directory (`optuna-dashboard
sqlite:///RUN_DIR/optuna.db` opens it), one study per round: a round's data differ from
the last round's, so earlier objective values are stale, but earlier rounds' chosen
thresholds are enqueued first (a warm start re-scored on the new data).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna

from misstep.metrics.judge_metric import Thresholds
from misstep.metrics.stats import Rate


@dataclass
class TuningResult:
    thresholds: Thresholds
    precision: Rate
    kept: int
    judged: int
    trial: int
    study: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": asdict(self.thresholds),
            "precision": self.precision.to_dict(),
            "kept": self.kept,
            "judged": self.judged,
            "trial": self.trial,
            "study": self.study,
            "reason": self.reason,
        }


def score(decisions: list[dict[str, Any]], thresholds: Thresholds) -> tuple[Rate, int]:
    """(precision against the oracle, kept count) of `thresholds` over oracle-labelled decisions."""
    kept = [d for d in decisions if thresholds.admit(d)]
    return Rate(sum(bool(d["oracle_recovery_ok"]) for d in kept), len(kept)), len(kept)


def tune_thresholds(
    decisions: list[dict[str, Any]],
    storage: Path,
    round_index: int,
    *,
    trials: int = 60,
    min_yield: float = 0.05,
    warm_start: list[Thresholds] = (),
    seed: int = 0,
) -> TuningResult:
    """Run (or resume) round `round_index`'s study over `decisions` and choose thresholds."""
    labelled = [d for d in decisions if "oracle_recovery_ok" in d]
    if not labelled:
        raise ValueError("no judged trace carries an oracle verdict to tune against")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"thresholds-round-{round_index}"
    study = optuna.create_study(
        storage=f"sqlite:///{storage}",
        study_name=name,
        load_if_exists=True,
        directions=["maximize", "maximize"],
        sampler=optuna.samplers.TPESampler(seed=seed + round_index),
    )
    with warnings.catch_warnings():  # set_metric_names is marked experimental; it only labels the dashboard
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["precision", "yield"])
    if not study.trials:
        for thresholds in [Thresholds(), *warm_start]:
            study.enqueue_trial(asdict(thresholds), skip_if_exists=True)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        thresholds = Thresholds(
            min_confidence=trial.suggest_float("min_confidence", 0.0, 1.0),
            min_quality=trial.suggest_float("min_quality", 0.0, 1.0),
        )
        precision, kept = score(labelled, thresholds)
        trial.set_user_attr("kept", kept)
        trial.set_user_attr("precision_low", precision.interval[0] if kept else 0.0)
        return (precision.value if kept else 0.0), kept / len(labelled)

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < trials:  # a resumed round runs only the trials it still lacks
        study.optimize(objective, n_trials=trials - done)

    front = [t for t in study.best_trials if t.values[1] >= min_yield]
    reason = f"Pareto front, yield >= {min_yield:.0%}: highest Wilson lower bound on precision"
    if not front:  # nothing keeps enough: take the trial that keeps the most
        front = [max(study.trials, key=lambda t: (t.values or (0, 0))[1])]
        reason = f"no trial on the Pareto front keeps {min_yield:.0%}: the highest-yield trial"
    chosen = max(front, key=lambda t: (t.user_attrs["precision_low"], t.values[1], -t.number))
    thresholds = Thresholds(**chosen.params)
    precision, kept = score(labelled, thresholds)
    return TuningResult(
        thresholds=thresholds,
        precision=precision,
        kept=kept,
        judged=len(labelled),
        trial=chosen.number,
        study=name,
        reason=reason,
    )
