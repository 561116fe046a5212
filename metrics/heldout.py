"""Held-out location accuracy on a committed split, beside the baselines a model must beat.

Every figure comes with the two floors computed on the same items: the majority label (the
split's most common first-error step, or "no mistake") and always-the-last-step. Per-item
predictions are saved in one format, so that models, rounds and arms are compared on the same
items with McNemar's test rather than by two separate intervals:

    predictions.jsonl: {"item_id", "task", "gold", "predicted", "correct", "parsed", "raw"}

`gold` and `predicted` are 0-based step indices, null for "no mistake"; `predicted` is -1 for a
step the chain does not have and null also where the answer did not parse (`parsed` false).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from misstep.data.loaders import load_chains
from misstep.data.procedural import Difficulty, make_chains
from misstep.data.records import Chain
from misstep.data.runfiles import read_records
from misstep.data.splits import SplitItem, bbm_items, gsm8k_items, shuffled
from misstep.metrics.injector import has_annotations, inject_many, types_in_turn
from misstep.metrics.oracle import first_error
from misstep.metrics.stats import Rate, answer_spread, mcnemar_p

# Sizes of the committed splits: the test split is large enough to see a gap of about ten
# points, the validation split (used to choose rounds and settings) is disjoint from it.
GSM8K_SIZES = {"test": 360, "validation": 180}
VALID_SHARE = 0.15
BBM_SIZES = {"test": 200, "validation": 99}
LEVEL_SIZES = {"test": 120, "validation": 60}  # per difficulty level of the procedural problems
HELDOUT_SEED = -1  # the procedural held-out sets' seed; the loop's generator draws from seeds >= 0
NUMBER_IN_TEXT = re.compile(r"\d+(?:\.\d+)?")


def build_gsm8k_splits(
    path: Path, seed: int = 0, sizes: dict[str, int] = GSM8K_SIZES, valid_share: float = VALID_SHARE
) -> dict[str, list[SplitItem]]:
    """Test and validation splits from GSM8K test solutions, disjoint by question: per split,
    `valid_share` of the items are valid solutions ("no mistake"), the rest injected errors
    (error types in turn, only errors that change the final answer)."""
    chains = shuffled([c for c in load_chains(path) if first_error(c.steps) is None], seed)
    return splits_of_valid_chains(chains, seed, sizes, valid_share, where=str(path))


def build_level_splits(
    difficulty: Difficulty, seed: int = HELDOUT_SEED, sizes: dict[str, int] = LEVEL_SIZES
) -> dict[str, list[SplitItem]]:
    """Test and validation splits of procedural problems at one difficulty, made from a seed the
    loop's generator never draws (its seeds are not negative); built as the GSM8K splits are."""
    chains = make_chains(difficulty, 2 * sum(sizes.values()), seed=seed)
    return splits_of_valid_chains(chains, 0, sizes, VALID_SHARE, where=f"level {difficulty.level}")


def splits_of_valid_chains(
    chains: list[Chain], seed: int, sizes: dict[str, int], valid_share: float, where: str
) -> dict[str, list[SplitItem]]:
    """Disjoint splits of `sizes` from valid chains, in their order: per split, `valid_share` of
    the items kept as they are ("no mistake"), the rest with an injected error (error types in
    turn, only errors that change the final answer)."""
    out, cursor = {}, 0
    for split, size in sizes.items():
        n_valid = round(size * valid_share)
        valid = chains[cursor : cursor + n_valid]
        cursor += n_valid
        pairs: list = []
        while len(pairs) < size - n_valid:
            if cursor >= len(chains):
                raise ValueError(f"{where}: too few valid chains for a {split} split of {size}")
            # Error types in turn across the split, as inject_many gives them over a list.
            if has_annotations(chains[cursor]):
                pairs += inject_many([chains[cursor]], types_in_turn(cursor), seed=seed)
            cursor += 1
        out[split] = gsm8k_items(pairs, valid, split)
    return out


def build_bbm_splits(path: Path, seed: int = 0, sizes: dict[str, int] = BBM_SIZES) -> dict[str, list[SplitItem]]:
    """Test and validation splits of one BIG-Bench Mistake task, its traces as they are."""
    chains = shuffled(load_chains(path), seed)
    if len(chains) < sum(sizes.values()):
        raise ValueError(f"{path}: {len(chains)} traces, fewer than the {sum(sizes.values())} the splits need")
    out, cursor = {}, 0
    for split, size in sizes.items():
        out[split] = bbm_items(chains[cursor : cursor + size], split)
        cursor += size
    return out


def majority_label(items: list[SplitItem]) -> int | None:
    """The split's most common first-error label (ties go to the earlier step, then "no mistake")."""
    counts = Counter(item.chain.mistake_index for item in items)
    return max(counts, key=lambda label: (counts[label], -(label if label is not None else 10**6)))


def baseline_outcomes(items: list[SplitItem]) -> dict[str, list[bool]]:
    """Per item, whether each floor is right: always the majority label, always the last step."""
    majority = majority_label(items)
    return {
        "majority": [item.chain.mistake_index == majority for item in items],
        "last_step": [item.chain.mistake_index == len(item.chain.steps) - 1 for item in items],
    }


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """predictions.jsonl by item id."""
    return {r["item_id"]: r for r in read_records(Path(path))}


def score(items: list[SplitItem], predictions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Location accuracy on `items` beside both baselines, McNemar's p against the better one,
    and the spread of the model's answers (a constant answer is a collapse)."""
    missing = [item.item_id for item in items if item.item_id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} items, e.g. {missing[:3]}")
    correct = [bool(predictions[item.item_id]["correct"]) for item in items]
    floors = baseline_outcomes(items)
    better = max(floors, key=lambda name: sum(floors[name]))
    answers = [
        predictions[item.item_id]["predicted"] if predictions[item.item_id]["parsed"] else "unparsed" for item in items
    ]
    return {
        "n": len(items),
        "correct": sum(correct),
        "accuracy": Rate(sum(correct), len(items)).to_dict(),
        "majority_baseline_correct": sum(floors["majority"]),
        "majority_label": majority_label(items),
        "last_step_baseline_correct": sum(floors["last_step"]),
        "better_baseline": better,
        "mcnemar_p": mcnemar_p(correct, floors[better]),
        "parsed": sum(bool(predictions[item.item_id]["parsed"]) for item in items),
        "answers": answer_spread(answers, [len(item.chain.steps) - 1 for item in items]),
    }


def _label(index: int | None) -> str:
    return "no mistake" if index is None else f"step {index + 1}"


def confusion(items: list[SplitItem], predictions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the model answered for each true label ({"step 2": {"step 1": n, ...}, "no mistake": ...},
    "unparsed" where an answer did not parse). How often it named the chain's last step (a shortcut
    a model can learn where late errors are common) is `score`'s answers.last_step_share."""
    table: dict[str, Counter] = {}
    for item in items:
        prediction = predictions[item.item_id]
        answer = _label(prediction["predicted"]) if prediction["parsed"] else "unparsed"
        table.setdefault(_label(item.chain.mistake_index), Counter())[answer] += 1
    ordered = sorted(table, key=lambda label: (label == "no mistake", len(label), label))
    return {"by_true_label": {label: dict(table[label].most_common()) for label in ordered}}


def compare(items: list[SplitItem], first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]) -> dict:
    """Two models (rounds, arms) on the same items: each one's correct count and McNemar's p."""
    a = [bool(first[item.item_id]["correct"]) for item in items]
    b = [bool(second[item.item_id]["correct"]) for item in items]
    return {"n": len(items), "first_correct": sum(a), "second_correct": sum(b), "mcnemar_p": mcnemar_p(a, b)}


def _largest_number(chain) -> float:
    numbers = [float(n) for step in chain.steps for n in NUMBER_IN_TEXT.findall(step.replace(",", ""))]
    return max(numbers, default=0.0)


def _size_bucket(value: float) -> str:
    for bound, label in ((10, "<10"), (100, "10-99"), (1000, "100-999")):
        if value < bound:
            return label
    return ">=1000"


SLICES: dict[str, Callable[[SplitItem], str]] = {
    "error_type": lambda item: item.error_type or ("none" if item.chain.mistake_index is None else "labelled"),
    "error_position": lambda item: (
        "none"
        if item.chain.mistake_index is None
        else str(min(item.chain.mistake_index + 1, 5)) + ("+" if item.chain.mistake_index >= 4 else "")
    ),
    "steps": lambda item: str(min(len(item.chain.steps), 6)) + ("+" if len(item.chain.steps) >= 6 else ""),
    "operand_size": lambda item: _size_bucket(_largest_number(item.chain)),
}


def slices(
    items: list[SplitItem], predictions: dict[str, dict[str, Any]], min_items: int = 30, alpha: float = 0.05
) -> list[dict[str, Any]]:
    """Where a model beats the floor: for each slice (error type, position of the first error,
    number of steps, size of the largest number) with at least `min_items` items, its accuracy
    beside both of the slice's own floors (its most common label; always the last step), and
    McNemar's p against the better one, as the whole set is scored: a shortcut such as "the last
    step" beats a slice's majority floor wherever that slice's errors are late. `significant`
    marks the slices where the model is better than both with p < `alpha`."""
    out = []
    for dimension, key in SLICES.items():
        groups: dict[str, list[SplitItem]] = {}
        for item in items:
            groups.setdefault(key(item), []).append(item)
        for value, members in sorted(groups.items()):
            if len(members) < min_items:
                continue
            correct = [bool(predictions[item.item_id]["correct"]) for item in members]
            floors = baseline_outcomes(members)
            better = max(floors, key=lambda name: sum(floors[name]))
            p = mcnemar_p(correct, floors[better])
            out.append(
                {
                    "slice": dimension,
                    "value": value,
                    "n": len(members),
                    "correct": sum(correct),
                    "majority_baseline_correct": sum(floors["majority"]),
                    "last_step_baseline_correct": sum(floors["last_step"]),
                    "better_baseline": better,
                    "mcnemar_p": p,
                    "significant": sum(correct) > sum(floors[better]) and p < alpha,
                }
            )
    return out
