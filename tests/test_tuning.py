"""Optuna threshold tuning on judged traces with oracle verdicts, in a real SQLite study."""

import random

import optuna
import pytest

from misstep.metrics.judge_metric import Thresholds
from misstep.optimize.tuning import score, tune_thresholds


def _decisions(n=300, seed=0):
    """A judge whose confidence carries signal: right recoveries tend to score higher."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        right = rng.random() < 0.4
        confidence = min(1.0, max(0.0, rng.gauss(0.75 if right else 0.45, 0.15)))
        out.append(
            {
                "verdict": True,
                "confidence": confidence,
                "keep": True,
                "quality": rng.random(),
                "oracle_recovery_ok": right,
            }
        )
    return out


def test_tuning_beats_the_default_thresholds_and_persists(tmp_path):
    decisions = _decisions()
    storage = tmp_path / "optuna.db"
    result = tune_thresholds(decisions, storage, round_index=1, trials=40, min_yield=0.1)
    default_precision, _ = score(decisions, Thresholds())
    assert result.precision.value > default_precision.value  # confidence carries signal; tuning finds it
    assert result.kept >= 0.1 * len(decisions)
    assert result.thresholds.min_confidence > 0.5

    study = optuna.load_study(study_name="thresholds-round-1", storage=f"sqlite:///{storage}")
    assert len(study.trials) == 40
    assert study.trials[0].params == {"min_confidence": 0.5, "min_quality": 0.5}  # the defaults are tried first

    again = tune_thresholds(decisions, storage, round_index=1, trials=40, min_yield=0.1)  # resumed: no new trials
    assert len(optuna.load_study(study_name="thresholds-round-1", storage=f"sqlite:///{storage}").trials) == 40
    assert again.thresholds == result.thresholds


def test_the_next_round_starts_from_the_last_rounds_choice(tmp_path):
    storage = tmp_path / "optuna.db"
    first = tune_thresholds(_decisions(seed=1), storage, round_index=1, trials=20)
    tune_thresholds(_decisions(seed=2), storage, round_index=2, trials=20, warm_start=[first.thresholds])
    second = optuna.load_study(study_name="thresholds-round-2", storage=f"sqlite:///{storage}")
    assert second.trials[1].params == {
        "min_confidence": first.thresholds.min_confidence,
        "min_quality": first.thresholds.min_quality,
    }


def test_without_oracle_verdicts_there_is_nothing_to_tune_against(tmp_path):
    with pytest.raises(ValueError, match="oracle verdict"):
        tune_thresholds(
            [{"verdict": True, "confidence": 0.9, "keep": True, "quality": 0.9}], tmp_path / "o.db", round_index=1
        )
