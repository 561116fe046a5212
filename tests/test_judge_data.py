"""The judge's ground truth: a success and a failure per chain, the failures written by the model
where it wrote one, confidence in levels."""

from misstep.optimize.demos import recovery_text
from misstep.optimize.judge_data import CONFIDENCE, composition, injected_pairs, judge_examples


def test_each_chain_gives_a_success_and_its_best_failure_with_confidence_by_kind(gsm8k_train):
    pairs = injected_pairs(gsm8k_train, k=12, seed=0)
    assert len(pairs) == 12
    # The model "wrote" failures for half the chains (its recoveries the oracle rejected).
    failures = {bad.source_id: f"Step 1: wrong\nFinal answer: {n}" for n, (_, bad) in enumerate(pairs[::2])}
    examples = judge_examples(pairs, failures)
    assert len(examples) == 2 * len(pairs)
    for (valid, bad), success, failure in zip(pairs, examples[::2], examples[1::2]):
        assert success.recovery_succeeded and success.recovery == recovery_text(valid.steps, valid.answer)
        assert not failure.recovery_succeeded and failure.confidence == CONFIDENCE[failure.kind]
        if failure.kind == "written":
            assert failure.recovery == failures[bad.source_id]
        elif bad.mistake_index + 1 < len(bad.steps):  # the wrong step fixed, the rest still the mistaken chain's
            assert failure.kind == "partial"
            assert bad.steps[bad.mistake_index] not in failure.recovery
            assert failure.recovery.endswith(f"Final answer: {bad.answer}")
        else:
            assert failure.kind == "copy" and failure.recovery == recovery_text(bad.steps, bad.answer)
    made = composition(examples)
    assert made["by_kind"]["success"] == 12 and made["by_kind"]["written"] == 6
    assert made["by_kind"]["written"] >= sum(v for k, v in made["by_kind"].items() if k != "success") / 2
    assert len(made["confidence_levels"]) >= 3


def test_a_model_that_fails_every_recovery_still_leaves_a_quarter_made_failures(gsm8k_train):
    """The base model's recoveries all fail (16 of 16 in the arms run): written failures alone would
    leave two confidence levels and no near miss to learn from."""
    pairs = injected_pairs(gsm8k_train, k=12, seed=0)
    failures = {bad.source_id: f"Step 1: wrong\nFinal answer: {n}" for n, (_, bad) in enumerate(pairs)}
    made = composition(judge_examples(pairs, failures))
    assert made["by_kind"]["written"] == 9  # three quarters of the failures, at least half
    assert made["by_kind"].get("partial", 0) + made["by_kind"].get("copy", 0) == 3
    assert len(made["confidence_levels"]) >= 3
