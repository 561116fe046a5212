"""The loop's stop rule and diversity measures on constructed histories."""

import pytest

from misstep.metrics.health import StopRule, diversity, judge_health, near_duplicate_rate
from misstep.metrics.stats import Rate, two_proportion_p


def test_two_proportion_test_separates_real_gains_from_noise():
    assert two_proportion_p(Rate(60, 100), Rate(30, 100)) < 0.001
    assert two_proportion_p(Rate(32, 100), Rate(30, 100)) > 0.3
    assert two_proportion_p(Rate(30, 100), Rate(60, 100)) > 0.99  # one-sided: a drop is no gain
    assert two_proportion_p(Rate(0, 0), Rate(3, 10)) == 1.0


def test_a_loop_that_keeps_improving_continues():
    verdict = judge_health([Rate(20, 200), Rate(40, 200), Rate(70, 200)], [None, 0.6, 0.58])
    assert not verdict.stop and verdict.best_round == 2


def test_no_significant_gain_for_patience_rounds_is_a_plateau():
    history = [Rate(20, 200), Rate(50, 200), Rate(53, 200), Rate(51, 200)]
    verdict = judge_health(history, [None, 0.6, 0.6, 0.6], StopRule(patience=2))
    assert verdict.stop and verdict.reason == "plateau" and verdict.best_round == 2
    assert not judge_health(history[:3], [None, 0.6, 0.6], StopRule(patience=3)).stop  # patience not yet spent


def test_a_significant_drop_or_a_diversity_fall_is_a_collapse():
    fell = judge_health([Rate(20, 200), Rate(80, 200), Rate(40, 200)], [None, 0.6, 0.6])
    assert fell.stop and fell.reason == "collapse" and fell.best_round == 1
    repeating = judge_health([Rate(20, 200), Rate(40, 200), Rate(60, 200)], [None, 0.6, 0.3])
    assert repeating.stop and repeating.reason == "collapse" and "distinct-2" in repeating.detail


def test_diversity_sees_outputs_collapse_into_copies():
    varied = ["Step 1: 3 + 4 = 7", "Step 2: 12 / 3 = 4 apples", "She sells 9 eggs for $2 each"]
    copies = ["Step 1: 3 + 4 = 7 so the answer is 7"] * 3
    assert diversity(varied)["distinct_2"] > diversity(copies)["distinct_2"]
    assert near_duplicate_rate(copies) == 1.0 and near_duplicate_rate(varied) == 0.0
    assert diversity([])["distinct_1"] is None


def test_an_empty_history_is_refused():
    with pytest.raises(ValueError):
        judge_health([], [])
