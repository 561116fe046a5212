"""Held-out splits, their baselines, paired tests and the spread of answers: what every figure stands beside."""

import json
from collections import Counter

import pytest

from misstep.data import DataFileError, sample_path
from misstep.data.splits import SplitItem, load_split, normalize_question, save_split, split_path, without_heldout
from misstep.metrics.heldout import (
    baseline_outcomes,
    build_gsm8k_splits,
    compare,
    confusion,
    majority_label,
    score,
    slices,
)
from misstep.metrics.oracle import first_error
from misstep.metrics.stats import LAST_STEP, answer_spread, mcnemar_p

BBM_TASKS = ("logical_deduction", "multistep_arithmetic", "word_sorting")


def test_the_committed_splits_have_the_power_and_disjointness_asked_of_them():
    test, validation = load_split(split_path("gsm8k", "test")), load_split(split_path("gsm8k", "validation"))
    assert len(test) >= 300 and len(validation) >= 150
    for items in (test, validation):
        valid_share = sum(i.chain.mistake_index is None for i in items) / len(items)
        assert 0.10 <= valid_share <= 0.20  # "no mistake" is a class a model can get wrong
        for item in items:
            if item.chain.mistake_index is not None:  # an injected label the oracle confirms on its own
                assert item.error_type is not None
        types = Counter(i.error_type for i in items if i.error_type)
        assert len(types) == 5 and min(types.values()) >= 0.15 * sum(types.values())  # error types in turn
    questions = lambda items: {normalize_question(i.chain.question) for i in items}  # noqa: E731
    assert not questions(test) & questions(validation)
    for task in BBM_TASKS:
        bbm_test, bbm_validation = load_split(split_path(task, "test")), load_split(split_path(task, "validation"))
        assert len(bbm_test) >= 100 and len(bbm_validation) >= 50
        assert not {i.item_id for i in bbm_test} & {i.item_id for i in bbm_validation}


def test_gsm8k_splits_are_a_pure_function_of_the_data_and_labelled_exactly():
    first = build_gsm8k_splits(sample_path("gsm8k/test.jsonl"), sizes={"test": 12, "validation": 6})
    again = build_gsm8k_splits(sample_path("gsm8k/test.jsonl"), sizes={"test": 12, "validation": 6})
    assert [i.to_dict() for i in first["test"]] == [i.to_dict() for i in again["test"]]
    assert sum(i.chain.mistake_index is None for i in first["test"]) == 2  # round(12 * 0.15)
    for item in first["test"] + first["validation"]:
        if item.chain.mistake_index is None:
            assert first_error(item.chain.steps) is None
    assert not {i.chain.question for i in first["test"]} & {i.chain.question for i in first["validation"]}


def test_a_bad_split_line_names_the_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    item = SplitItem(
        "a#0",
        "test",
        build_gsm8k_splits(sample_path("gsm8k/test.jsonl"), sizes={"test": 2, "validation": 1})["test"][0].chain,
    )
    save_split(path, [item])
    path.write_text(path.read_text() + json.dumps({"item_id": "b", "split": "test"}) + "\n")
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: field 'chain': missing"):
        load_split(path)
    path.write_text(path.read_text().splitlines()[0] + "\n" + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataFileError, match=r"bad.jsonl:2: field 'item_id'.*twice"):
        load_split(path)


def test_without_heldout_compares_normalised_questions(gsm8k_test):
    disguised = [
        c.__class__(**{**c.to_dict(), "question": "  " + c.question.upper().replace(" ", "\n ")})
        for c in gsm8k_test[:3]
    ]
    kept = without_heldout(disguised + gsm8k_test[3:6], gsm8k_test[:3])
    assert [c.question for c in kept] == [c.question for c in gsm8k_test[3:6]]


def test_mcnemar_counts_only_the_items_that_differ():
    # 10 items only the first gets right, 2 only the second: exact two-sided p = 2 * P(X <= 2 | 12, 1/2)
    first = [True] * 10 + [False] * 2 + [True] * 30 + [False] * 8
    second = [False] * 10 + [True] * 2 + [True] * 30 + [False] * 8
    assert mcnemar_p(first, second) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_p(first, first) == 1.0
    assert mcnemar_p(first, second) == mcnemar_p(second, first)
    with pytest.raises(ValueError):
        mcnemar_p([True], [True, False])


def test_score_stands_every_accuracy_beside_both_floors_and_sees_a_constant_answer():
    items = load_split(split_path("gsm8k", "test"))
    floors = baseline_outcomes(items)
    label = majority_label(items)
    assert sum(floors["majority"]) == Counter(i.chain.mistake_index for i in items)[label]
    assert sum(floors["last_step"]) == sum(i.chain.mistake_index == len(i.chain.steps) - 1 for i in items)
    # A model that always names the majority step equals that floor, and its answers have collapsed.
    constant = {
        i.item_id: {"predicted": label, "parsed": True, "correct": i.chain.mistake_index == label} for i in items
    }
    scored = score(items, constant)
    assert scored["correct"] == scored["majority_baseline_correct"] and scored["n"] == len(items)
    assert scored["answers"]["top_share"] == 1.0 and scored["answers"]["entropy_bits"] == 0.0
    assert scored["mcnemar_p"] == 1.0 or scored["better_baseline"] == "last_step"
    perfect = {i.item_id: {"predicted": i.chain.mistake_index, "parsed": True, "correct": True} for i in items}
    assert score(items, perfect)["mcnemar_p"] < 1e-6
    assert compare(items, perfect, constant)["mcnemar_p"] < 1e-6
    with pytest.raises(ValueError, match="no prediction"):
        score(items, dict(list(perfect.items())[:5]))


def test_answer_spread():
    assert answer_spread([1, 1, 1, None])["top_share"] == 0.75
    # Naming each chain's last step is one answer, however its step numbers vary.
    spread = answer_spread([2, 3, 4, 1], last_steps=[2, 3, 4, 5])
    assert spread["top_answer"] == LAST_STEP and spread["top_share"] == spread["last_step_share"] == 0.75
    assert spread["entropy_bits"] == pytest.approx(2.0)
    assert answer_spread([1, 1, 2], last_steps=[3, 3, 2])["top_answer"] == 1
    assert answer_spread([1, 2])["entropy_bits"] == pytest.approx(1.0)
    assert answer_spread([])["top_share"] is None


def test_slices_find_where_a_model_beats_its_own_floor():
    items = load_split(split_path("gsm8k", "test"))
    # A model that knows the errors made by a wrong operation and nothing else.
    predictions = {
        i.item_id: {"correct": i.error_type == "wrong_operation", "parsed": True, "predicted": i.chain.mistake_index}
        for i in items
    }
    found = slices(items, predictions)
    assert {row["slice"] for row in found} == {"error_type", "error_position", "steps", "operand_size"}
    assert all(row["n"] >= 30 for row in found)
    by_type = {row["value"]: row for row in found if row["slice"] == "error_type"}
    assert (
        by_type["wrong_operation"]["significant"]
        and by_type["wrong_operation"]["correct"] == by_type["wrong_operation"]["n"]
    )
    assert not by_type["arithmetic_slip"]["significant"] and by_type["arithmetic_slip"]["correct"] == 0
    positions = [row for row in found if row["slice"] == "error_position"]
    assert sum(row["n"] for row in positions) <= len(items)


def test_a_slice_is_not_won_by_the_last_step_shortcut():
    items = load_split(split_path("gsm8k", "test"))
    # Always the chain's last step: where a slice's errors are mostly late, that beats the slice's
    # majority label, and is still no skill.
    last_step = {
        i.item_id: {
            "predicted": len(i.chain.steps) - 1,
            "parsed": True,
            "correct": i.chain.mistake_index == len(i.chain.steps) - 1,
        }
        for i in items
    }
    assert score(items, last_step)["answers"]["top_answer"] == LAST_STEP  # a collapse the loop flags
    found = slices(items, last_step)
    beaten = [row for row in found if row["correct"] > row["majority_baseline_correct"]]
    assert beaten, "the split has slices whose errors are mostly at the last step"
    assert all(row["better_baseline"] == "last_step" and not row["significant"] for row in beaten)
    assert all(row["correct"] == row["last_step_baseline_correct"] for row in found)


def test_confusion_counts_each_true_label_s_answers_and_the_score_the_last_step_shortcut():
    items = load_split(split_path("gsm8k", "test"))
    # A model that always names the chain's last step, except that one answer does not parse.
    predictions = {i.item_id: {"predicted": len(i.chain.steps) - 1, "parsed": True, "correct": False} for i in items}
    predictions[items[0].item_id]["parsed"] = False
    table = confusion(items, predictions)
    assert score(items, predictions)["answers"]["last_step_share"] == (len(items) - 1) / len(items)
    rows = table["by_true_label"]
    assert sum(sum(row.values()) for row in rows.values()) == len(items)
    assert sum(rows["no mistake"].values()) == sum(i.chain.mistake_index is None for i in items)
    assert "no mistake" not in {answer for row in rows.values() for answer in row}  # never answered
    assert sum(row.get("unparsed", 0) for row in rows.values()) == 1
    assert list(rows)[:2] == ["step 1", "step 2"] and list(rows)[-1] == "no mistake"
