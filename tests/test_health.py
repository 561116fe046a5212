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


def test_a_fixed_budget_records_the_verdict_and_stops_nothing():
    history = [Rate(20, 200), Rate(50, 200), Rate(53, 200), Rate(51, 200)]
    plateau = judge_health(history, [None, 0.6, 0.6, 0.6], StopRule(patience=2, fixed_budget=True))
    assert not plateau.stop and plateau.reason == "plateau" and "fixed budget" in plateau.detail
    fell = judge_health([Rate(20, 200), Rate(80, 200), Rate(40, 200)], [None, 0.6, 0.6], StopRule(fixed_budget=True))
    assert not fell.stop and fell.reason == "collapse" and fell.best_round == 1


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


def test_one_stage3_answer_to_most_items_is_a_collapse_once_it_grows():
    rising = [Rate(40, 200), Rate(60, 200), Rate(80, 200)]  # accuracy alone would continue
    grown = judge_health(rising, [None, 0.6, 0.6], top_share=[0.3, 0.5, 0.9])
    assert grown.stop and grown.reason == "collapse" and "90%" in grown.detail
    # A degenerate round 0 is no reason to stop after round 1 when round 1 answers more variously.
    easing = judge_health(rising[:2], [None, 0.6], top_share=[0.95, 0.7])
    assert not easing.stop
    below_flag = judge_health(rising, [None, 0.6, 0.6], top_share=[0.2, 0.4, 0.55])
    assert not below_flag.stop


def test_the_evaluation_summary_carries_both_floors_and_the_answer_spread():
    from misstep.metrics.evaluation import summarize

    records = [
        {"task": "gsm8k", "gold": gold, "steps": steps, "predicted": 0, "parsed": True, "location_ok": gold == 0}
        for gold, steps in [(0, 3), (2, 3), (2, 3), (1, 4), (None, 2)]
    ]
    summary = summarize(records)["gsm8k"]
    assert summary["majority_baseline"].k == 2  # step 3 is the most common label
    assert summary["last_step_baseline"].k == 2  # (2, 3) twice; a valid chain has no last-step error
    assert summary["answers"]["top_share"] == 1.0
