import math

import pytest

from misstep.data.records import Scenario
from misstep.metrics.checks import check_scenario, departure
from misstep.metrics.oracle import (
    NotArithmetic,
    answers_match,
    claims_in_step,
    evaluate,
    final_number,
    first_error,
)


def test_real_gsm8k_chains_check_out(gsm8k_test, gsm8k_train):
    flagged = [c.source_id for c in gsm8k_test + gsm8k_train if first_error(c.steps) is not None]
    assert flagged == []  # the shipped samples hold no GSM8K solution with a slip of its own


def test_annotation_with_wrong_result_is_the_first_error(gsm8k_test):
    chain = gsm8k_test[0]
    steps = list(chain.steps)
    steps[1] = steps[1].replace("<<9*2=18>>18", "<<9*2=19>>19")
    assert first_error(steps) == 1
    assert first_error(chain.steps) is None


@pytest.mark.parametrize(
    "step, ok",
    [
        ("17 + 25 = 32", False),
        ("17 + 25 = 42", True),
        ("She pays 3 x 4 = $12 in total.", True),
        ("She pays 3 x 4 = $13 in total.", False),
        ("A = (-9 - 5 - 0) = (-9 - 5) = -14.", True),
        ("A = (-9 - 5 - 0) = (-9 - 6) = -15.", False),
        ("10 / 3 = 3.33 hours", True),
        ("1,000 + 250 = 1,250 people", True),
        ("18 / 450 x 100 = 4%", True),
    ],
)
def test_plain_claims_as_a_model_writes_them(step, ok):
    claims = claims_in_step(step)
    assert claims, step
    assert all(c.ok for c in claims) is ok


@pytest.mark.parametrize(
    "prose",
    [
        "There are 60 students x 2/3 = 40 of them",  # cut by a word: no claim is invented
        "Solve 3x + 4 = 28",  # algebra, not arithmetic
        "The answer is 5.",
    ],
)
def test_text_that_is_not_a_whole_claim_is_not_checked(prose):
    assert claims_in_step(prose) == []


def test_chain_checked_against_its_valid_original_catches_consistent_mistakes(gsm8k_test):
    valid = gsm8k_test[0].steps
    wrong_operand = (valid[0], valid[1].replace("9 * 2 = $<<9*2=18>>18", "16 * 2 = $<<16*2=32>>32"))
    assert first_error(wrong_operand) is None  # the arithmetic is right...
    assert first_error(wrong_operand, reference=valid) == 1  # ...the value is not


@pytest.mark.parametrize("hostile", ["__import__('os').system('true')", "(1).__class__", "9**9**9", "a + 1", "f(2)"])
def test_evaluation_never_runs_arbitrary_text(hostile):
    with pytest.raises(NotArithmetic):
        evaluate(hostile)


def test_evaluation_arithmetic():
    assert evaluate("2 + 3 * 4") == 14
    assert evaluate("$1,200 / 4") == 300
    assert evaluate("50 * 20%") == 10
    assert math.isnan(evaluate("1/0"))


def test_answers_compare_as_numbers_or_text():
    assert answers_match("The answer is $1,234.", "1234")
    assert answers_match("18.0", "18")
    assert not answers_match("17", "18")
    assert not answers_match(None, "18")
    assert answers_match("(E)", "(E)")
    assert answers_match("So the answer is apple banana", "apple banana")
    assert not answers_match("banana apple", "apple banana")
    assert final_number("no digits") is None


def test_a_written_chain_departs_where_its_text_first_differs_and_a_copy_never_does(gsm8k_test):
    valid = gsm8k_test[0].steps
    assert departure(valid, valid) is None
    assert departure(valid, [f"  {s}  ".replace(" ", "  ") for s in valid]) is None  # spacing is not a mistake
    changed = list(valid)
    changed[1] = changed[1].replace("=", "= 1 +", 1)
    assert departure(valid, changed) == 1
    assert departure(valid, valid[:-1]) == len(valid) - 1  # a step left out departs where it ends
    copied = Scenario(gsm8k_test[0], "arithmetic_slip", invalid_steps=tuple(valid))
    assert check_scenario(copied)["writer_failed"] is True  # the scenario says so: nothing to train as a mistake
    written = Scenario(gsm8k_test[0], "arithmetic_slip", invalid_steps=tuple(changed))
    assert check_scenario(written)["departure"] == 1 and check_scenario(written)["writer_failed"] is False
