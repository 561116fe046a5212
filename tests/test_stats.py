import math

import pytest

from misstep.metrics.stats import Rate, agreement, majority_baseline, wilson_interval


def test_wilson_interval_matches_published_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_agreement_precision_and_recall():
    predicted = [True, True, True, False, False]
    truth = [True, False, True, True, False]
    result = agreement(predicted, truth)
    assert (result["precision"].k, result["precision"].n) == (2, 3)
    assert (result["recall"].k, result["recall"].n) == (2, 3)
    assert result["accuracy"] == Rate(3, 5)


def test_majority_baseline():
    assert majority_baseline([None, 1, 1, 2]) == Rate(2, 4)
    assert str(Rate(0, 0)) == "n/a (0)"
    assert Rate(0, 0).to_dict() == {"k": 0, "n": 0, "value": None, "low": None, "high": None}


def test_balanced_accuracy_gives_a_one_sided_judge_one_half_however_the_classes_are_mixed():
    from misstep.metrics.stats import balanced_accuracy

    truth = [True] * 10 + [False] * 90
    assert balanced_accuracy([True] * 100, truth)["value"] == 0.5  # a judge that accepts everything
    assert balanced_accuracy([False] * 100, truth)["value"] == 0.5  # plain accuracy would say 0.9
    judged = balanced_accuracy([True] * 8 + [False] * 2 + [False] * 60 + [True] * 30, truth)
    assert judged["value"] == pytest.approx((0.8 + 60 / 90) / 2)
    assert judged["true_positive_rate"].k == 8 and judged["true_negative_rate"].n == 90
    assert balanced_accuracy([True, False], [True, True])["value"] is None  # no negatives to tell apart


def test_a_tie_for_the_commonest_answer_goes_the_same_way_whatever_the_items_order():
    from misstep.metrics.stats import answer_spread

    answers, last_steps = [3, 1, 1, 3, None, None], [4, 4, 4, 4, 2, 2]
    forward = answer_spread(answers, last_steps)
    backward = answer_spread(answers[::-1], last_steps[::-1])
    assert forward == backward and forward["top_share"] == pytest.approx(1 / 3)
