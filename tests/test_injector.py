from collections import Counter
from pathlib import Path

import pytest

from misstep.data import load_chains
from misstep.data.records import Chain, parse_steps
from misstep.metrics.injector import (
    INJECTABLE_TYPES,
    InjectionError,
    applicable_steps,
    format_number,
    inject,
    inject_many,
)
from misstep.metrics.oracle import answers_match, first_error
from misstep.optimize.demos import writer_chat_data, writer_ground_truth


@pytest.mark.parametrize("error_type", INJECTABLE_TYPES)
def test_every_injection_is_labelled_where_the_oracle_finds_it(gsm8k_test, error_type):
    made = 0
    for chain in gsm8k_test:
        try:
            corrupted = inject(chain, error_type, seed=3)
        except InjectionError:
            continue
        made += 1
        assert corrupted.mistake_index is not None
        assert first_error(corrupted.steps, reference=chain.steps) == corrupted.mistake_index
        if len(corrupted.steps) == len(chain.steps):  # all but a skipped step keep the steps before the error
            assert corrupted.steps[: corrupted.mistake_index] == chain.steps[: corrupted.mistake_index]
        assert corrupted.reference_answer == chain.reference_answer
    assert made >= 30


def test_arithmetic_slip_propagates_to_the_final_answer(gsm8k_test):
    chain = gsm8k_test[0]  # 16-3-4=9 ; 9*2=18
    corrupted = inject(chain, "arithmetic_slip", step=0, seed=0)
    assert corrupted.mistake_index == 0
    assert first_error(corrupted.steps) == 0  # a false claim, visible without the original
    assert not answers_match(corrupted.answer, chain.answer)
    assert corrupted.answer in corrupted.steps[1]  # the wrong value was carried into step 2


def test_skipped_step_drops_a_step_and_labels_its_first_use(gsm8k_test):
    made = inject_many([c for c in gsm8k_test if applicable_steps(c, "skipped_step")], ["skipped_step"])
    assert len(made) >= 20
    for chain, corrupted, _ in made:
        assert len(corrupted.steps) == len(chain.steps) - 1


def test_injection_is_deterministic_and_seeded(gsm8k_test):
    a = inject_many(gsm8k_test, seed=5)
    b = inject_many(gsm8k_test, seed=5)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert {t for _, _, t in a} == set(INJECTABLE_TYPES)
    assert all(not answers_match(bad.answer, good.answer) for good, bad, _ in a)


def test_inapplicable_requests_are_refused(gsm8k_test):
    chain = gsm8k_test[0]
    with pytest.raises(InjectionError, match="does not apply at step 5"):
        inject(chain, "arithmetic_slip", step=5)
    with pytest.raises(InjectionError, match="unknown error type"):
        inject(chain, "typo")
    corrupted = inject(chain, "arithmetic_slip", seed=0)
    with pytest.raises(InjectionError, match="already has a mistake"):
        inject(corrupted, "arithmetic_slip")


def test_writer_ground_truth_is_exact_for_each_error_type_it_can_make(gsm8k_train):
    types = ["arithmetic_slip", "wrong_operation", "skipped_step"]
    truth = writer_ground_truth(gsm8k_train, types, k=3)
    assert set(truth) == {"arithmetic_slip", "wrong_operation"}  # a skipped step is not step-aligned: no examples
    for stages in truth.values():
        assert len(stages["describe"]) == len(stages["corrupt"]) == 3
        for described, written in zip(stages["describe"], stages["corrupt"]):
            # The chain the writer is taught to write has its first error exactly where it says.
            invalid, valid = parse_steps(written.invalid_chain), parse_steps(written.valid_chain)
            assert first_error(invalid, reference=valid) == written.mistake_step - 1
            assert described.mistake_description.startswith(f"Step {described.mistake_step} computes")
    records = writer_chat_data(truth)
    assert len(records) == 2 * 2 * 3
    # Each record is under its own error type's signature (its instructions name the mistake).
    assert sum("arithmetic slip" in r["messages"][0]["content"] for r in records) == 3  # its describe records


PLAIN_CHAINS = Path(__file__).parent / "data" / "plain_chains.jsonl"  # written by hand: no annotations


def test_plain_arithmetic_chains_take_every_error_type_with_labels_the_oracle_confirms():
    chains = load_chains(PLAIN_CHAINS)
    made = Counter()
    for chain in chains:
        assert chain.is_valid and first_error(chain.steps) is None
        for error_type in INJECTABLE_TYPES:
            for step in applicable_steps(chain, error_type):
                try:
                    bad = inject(chain, error_type, step=step)
                except InjectionError:
                    continue
                assert first_error(bad.steps, reference=chain.steps) == bad.mistake_index
                assert not any("<<" in s for s in bad.steps)  # written as the chain was: plainly
                made[error_type] += 1
    assert set(made) == set(INJECTABLE_TYPES) and min(made.values()) >= 10, made


def test_plain_steps_keep_their_style_and_carry_the_wrong_value_to_the_answer():
    chains = {c.steps[0]: c for c in load_chains(PLAIN_CHAINS)}
    pencils = chains["Tom buys 3 boxes of 12 pencils, so he has 3*12=36 pencils"]
    slipped = inject(pencils, "arithmetic_slip", step=1)  # 36-9=27 becomes wrong; 27/3 follows it
    wrong = slipped.steps[1].split("=")[1].split()[0]
    assert wrong != "27" and slipped.steps[2].startswith(f"Each of his 3 friends gets {wrong}/3=")
    assert slipped.answer == format_number(float(wrong) / 3) != pencils.answer

    books = chains["The books cost $12 x 3 = $36."]
    assert inject(books, "wrong_operation", step=0).steps[0] == "The books cost $12 / 3 = $4."  # '$' stays
    stadium = chains["1,200 - 300 = 900 people came."]
    swapped = inject(stadium, "wrong_operation", step=0)
    assert swapped.steps == ("1,200 + 300 = 1500 people came.", "They paid 1500 * $5 = $7,500 in all.")
    apples = chains["The bags hold (3 * 4) = 12 = 12 apples."]
    chained = inject(apples, "arithmetic_slip", step=0).steps[0]
    value = chained.split("= ")[1].split()[0]
    assert value != "12" and chained == f"The bags hold (3 * 4) = {value} = {value} apples."  # restated too
    bakery = chains["He bakes 24 × 6 = 144 muffins."]
    assert inject(bakery, "wrong_operation", step=1).steps[1] == "That makes 144 × 8 = 1152 boxes."
    tank = chains["After the leak the tank holds 48 – 12 = 36 litres."]  # an en dash for '-'
    assert inject(tank, "wrong_operation", step=0).steps == (
        "After the leak the tank holds 48 + 12 = 60 litres.",
        "Each bucket gets 60 / 4 = 15 litres.",
    )
    assert inject(tank, "arithmetic_slip", step=0).steps[0].startswith("After the leak the tank holds 48 – 12 = ")
    laps = chains["36 minutes is 36 / 3 = 12 stretches of 3 minutes."]  # '.5' is one half, not five
    assert inject(laps, "wrong_operation", step=1).steps[1] == "She runs 12 / .5 = 24 km."


def test_an_annotated_decimal_without_its_leading_zero_stays_a_decimal():
    chain = Chain(
        question="A lap is .5 km. She runs 12 laps and then 4 km more. How far does she run?",
        steps=("She runs 12 * .5 = <<12*.5=6>>6 km in laps.", "In all 6 + 4 = <<6+4=10>>10 km."),
        answer="10",
        reference_answer="10",
        source_id="laps",
        task="gsm8k",
    )
    swapped = inject(chain, "wrong_operation", step=0)
    assert swapped.steps == ("She runs 12 / .5 = <<12/.5=24>>24 km in laps.", "In all 24 + 4 = <<24+4=28>>28 km.")
    assert first_error(swapped.steps, reference=chain.steps) == 0
