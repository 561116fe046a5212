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
