"""The procedural problems: valid by the oracle, right answers, knobs that change what the chains say,
the same chains for the same seed, and held-out sets no generated training chain can repeat."""

import re

import pytest

from misstep.data.procedural import LADDER, Difficulty, make_chain, make_chains
from misstep.data.splits import load_split, normalize_question, split_path
from misstep.metrics.heldout import HELDOUT_SEED, LEVEL_SIZES, build_level_splits
from misstep.metrics.injector import inject
from misstep.metrics.oracle import first_error
from misstep.optimize.curriculum import LevelProbe, choose_level
from misstep.signatures import DEFAULT_ERROR_TYPES

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


@pytest.mark.parametrize("difficulty", LADDER, ids=lambda d: f"level-{d.level}")
def test_chains_pass_the_oracle_with_right_answers_and_the_knobs_say_what_they_set(difficulty):
    chains = make_chains(difficulty, 40, seed=3)
    for chain in chains:
        assert first_error(chain.steps) is None and chain.is_valid and chain.task == "gsm8k"
        done = [ANNOTATION.search(step).groups() for step in chain.steps]
        assert len(done) == difficulty.steps  # one operation a step
        assert {op for _, op, _, _ in done} <= set(difficulty.ops)
        start = int(re.match(r"\w+ has (\d+) ", chain.question).group(1))
        assert start <= difficulty.max_number and done[0][0] == str(start)
        value = start
        for left, op, right, result in done:  # each step starts from the last one's result
            assert int(left) == value
            value = {"+": value + int(right), "-": value - int(right), "*": value * int(right)}.get(
                op, value // int(right)
            )
            assert int(result) == value >= 2
        assert chain.answer == chain.reference_answer == str(value)
        assert chain.question.count("'s ") - chain.question.count("collection") == difficulty.distractors
    assert len({c.question for c in chains}) == 40


def test_harder_levels_say_more_and_the_same_seed_gives_the_same_chains():
    assert [len(make_chain(d, 0).steps) for d in LADDER] == [d.steps for d in LADDER]
    assert [d.level for d in LADDER] == sorted(d.level for d in LADDER)
    assert make_chains(LADDER[3], 20, seed=5) == make_chains(LADDER[3], 20, seed=5)
    assert make_chains(LADDER[3], 20, seed=5) != make_chains(LADDER[3], 20, seed=6)
    with pytest.raises(ValueError, match="ops must be drawn from"):
        Difficulty(9, steps=2, max_number=20, ops=("^",), distractors=0)


def test_the_injector_and_the_oracle_work_on_them_as_they_are():
    confirmed = total = 0
    for index, chain in enumerate(make_chains(LADDER[2], 30, seed=1)):
        for error_type in DEFAULT_ERROR_TYPES:
            try:
                bad = inject(chain, error_type, seed=index)
            except ValueError:  # an error type with nowhere to go in this chain
                continue
            total += 1
            confirmed += first_error(bad.steps, reference=chain.steps) == bad.mistake_index
    assert total >= 140 and confirmed / total >= 0.95


def test_no_generated_training_chain_repeats_a_held_out_one():
    difficulty = LADDER[0]  # the smallest level: the fewest distinct problems, so repeats come soonest
    heldout = {normalize_question(item.chain.question) for item in load_split(split_path("level-1", "test"))}
    assert len(heldout) >= 100
    # Drawn from the held-out seed itself, the generator would give the held-out problems back;
    # the guard keeps every one of them out.
    fresh = make_chains(difficulty, 200, seed=HELDOUT_SEED, exclude=heldout)
    assert not {normalize_question(c.question) for c in fresh} & heldout


def test_the_committed_level_splits_are_what_the_builder_makes():
    for difficulty in LADDER[:2]:
        built = build_level_splits(difficulty)
        for split, size in LEVEL_SIZES.items():
            assert load_split(split_path(f"level-{difficulty.level}", split)) == built[split]
            assert len(built[split]) == size
        tests, validations = ({i.chain.question for i in built[s]} for s in ("test", "validation"))
        assert not tests & validations


def _probe(*rows):
    """LevelProbes from (correct, majority_correct) per level, 40 items each."""
    return [LevelProbe(level, 40, correct, majority) for level, (correct, majority) in enumerate(rows, start=1)]


def test_the_curriculum_moves_up_when_the_probe_succeeds_and_down_when_it_fails_one_level_a_round():
    solved_everywhere = _probe((40, 20), (40, 15), (40, 12), (40, 10))
    choice = choose_level(solved_everywhere, current=2)
    assert (choice.level, choice.frontier) == (3, 4) and "toward the harder frontier" in choice.reason
    failed_everywhere = _probe((20, 20), (15, 15), (12, 12), (9, 10))
    choice = choose_level(failed_everywhere, current=3)
    assert (choice.level, choice.frontier) == (2, 1) and "easier" in choice.reason
    half_way_at_two = _probe((38, 20), (28, 16), (13, 12), (10, 10))  # level 2: 12 of 24 to gain
    choice = choose_level(half_way_at_two, current=2)
    assert (choice.level, choice.frontier) == (2, 2) and "at the frontier" in choice.reason
    assert "level 2: 28/40 vs majority 16 (+0.50)" in choice.reason  # the probe's figures, logged
    assert choose_level(solved_everywhere, current=4).level == 4  # the top of the ladder holds
    with pytest.raises(ValueError, match="not among the probed levels"):
        choose_level(solved_everywhere, current=7)
