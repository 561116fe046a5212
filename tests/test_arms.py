from collections import Counter

from misstep.optimize.arms import balanced


def test_no_label_stays_more_than_twice_as_frequent_as_in_the_reference():
    answers = [2] * 70 + [1] * 20 + [3] * 10  # a student that mostly answers "step 2"
    reference = {1: 0.4, 2: 0.3, 3: 0.3}  # the held-out split's first errors
    kept = balanced(answers, lambda a: a, reference, seed=1)
    counts, n = Counter(kept), len(kept)
    assert all(counts[k] / n <= 2 * reference[k] + 1e-9 for k in counts)
    assert counts[1] == 20 and counts[3] == 10  # only the over-represented label loses items
    assert counts[2] < 70


def test_a_label_the_reference_never_asks_is_not_taught_and_a_balanced_set_is_untouched():
    assert balanced([1, 9, 2, 9], lambda a: a, {1: 1, 2: 1}) == [1, 2]
    items = [1, 2, 3, 1, 2, 3]
    assert balanced(items, lambda a: a, {1: 1, 2: 1, 3: 1}) == items


def test_what_is_dropped_is_drawn_by_the_seed_and_the_rest_keeps_its_order():
    items = [(2, i) for i in range(30)] + [(1, i) for i in range(10)]
    first = balanced(items, lambda a: a[0], {1: 0.8, 2: 0.2}, seed=0)
    assert first == balanced(items, lambda a: a[0], {1: 0.8, 2: 0.2}, seed=0)
    assert first != balanced(items, lambda a: a[0], {1: 0.8, 2: 0.2}, seed=1)
    assert first == sorted(first, key=items.index)


def _scenario(source_id, located_step, recovered, oracle):
    from misstep.data.records import Chain, Scenario, StageResult

    chain = Chain("q?", ("1 + 1 = 2", "2 * 3 = 6", "6 - 1 = 5"), "5", "5", source_id, "gsm8k")
    locate = (
        StageResult(ok=False, error="unparsable output")
        if located_step is None
        else StageResult(ok=True, outputs={"has_mistake": located_step > 0, "first_error_step": located_step})
    )
    recover = StageResult(ok=True, outputs={"recovered_steps": "x", "final_answer": "5"}) if recovered else None
    stages = {"locate": locate} | ({"recover": recover} if recover else {})
    return Scenario(chain, "arithmetic_slip", stages=stages, invalid_steps=chain.steps, oracle=oracle)


SCENARIOS = [
    # departs at step 2, where the oracle's first error is; the student says step 2 and recovers
    _scenario("a", 2, True, {"departure": 1, "invalid_first_error": 1, "recovery_ok": True}),
    # reworded step 1, erred at step 3: the student names the departure, and its recovery is wrong
    _scenario("b", 1, True, {"departure": 0, "invalid_first_error": 2, "recovery_ok": False}),
    # the writer copied the chain; the student still claims step 1
    _scenario("c", 1, False, {"departure": None, "writer_failed": True, "invalid_first_error": None}),
    # stage 3 did not parse
    _scenario("d", None, False, {"departure": 1, "invalid_first_error": 1}),
    # reworded step 2 without an error: the "recovery" keeps the answer, so the oracle passes it, and
    # the student says "no mistake", which is right
    _scenario("e", 0, True, {"departure": 1, "invalid_first_error": None, "recovery_ok": True}),
]
ACCEPTED = {"a": True, "b": True, "c": False, "d": False, "e": False}


def test_each_arm_admits_the_students_answers_by_its_own_check():
    from misstep.optimize.arms import sources, teach

    def kept(arm):
        return {t.key: (t.location, t.location_by, t.recovery_by) for t in teach(arm, SCENARIOS, ACCEPTED)}

    assert kept("oracle") == {
        "a": (1, "oracle", "oracle"),
        "b": (None, None, None),
        "c": (None, None, None),
        "d": (None, None, None),
        "e": (None, "oracle", None),  # "no mistake" taught; no recovery from an error there was not
    }
    assert kept("judge") == {
        "a": (1, "judge", "judge"),
        "b": (0, "judge", "judge"),  # the departure is no first error: the judge arm learns a wrong step
        "c": (None, None, None),  # no departure, no verdict: nothing taught as if it had a mistake
        "d": (None, None, None),
        "e": (None, None, None),
    }
    # the writer's copy is taught by no arm, not even "all"
    assert kept("all") == {
        "a": (1, "all", "all"),
        "b": (0, "all", "all"),
        "c": (None,) * 3,
        "d": (None,) * 3,
        "e": (None, "all", "all"),
    }
    judged = sources(teach("judge", SCENARIOS, ACCEPTED))
    assert judged == {"locations": {"judge": 2}, "locations_true": 1, "recoveries": {"judge": 2}, "recoveries_true": 1}
    for seed in range(8):
        drawn = teach("random", SCENARIOS, ACCEPTED, seed=seed)
        assert sum(t.location_by == "random" or t.recovery_by == "random" for t in drawn) <= 2
        assert not any(t.location_by or t.recovery_by for t in drawn if t.key == "c")
        assert teach("random", SCENARIOS, ACCEPTED, seed=seed) == drawn
