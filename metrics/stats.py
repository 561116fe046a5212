"""Rates with 95% confidence intervals, and the judge's agreement with ground truth."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with a Wilson 95% interval (well-behaved at 0, n and small n)."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def to_dict(self) -> dict:
        """JSON-ready; an empty rate has no value (null, not NaN, which JSON does not allow)."""
        if not self.n:
            return {**asdict(self), "value": None, "low": None, "high": None}
        low, high = self.interval
        return {**asdict(self), "value": self.value, "low": low, "high": high}

    def __str__(self) -> str:
        return rate_text(self.to_dict()) if self.n else "n/a (0)"


def rate_text(rate: dict | None) -> str:
    """A rate as run files store it (`Rate.to_dict`), as people read it: '0.433 [0.382, 0.485] (156/360)'."""
    if not rate or rate.get("value") is None:
        return "n/a"
    return f"{rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}] ({rate['k']}/{rate['n']})"


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(flags) -> Rate:
    flags = list(flags)
    return Rate(sum(bool(f) for f in flags), len(flags))


def agreement(predicted: list[bool], truth: list[bool]) -> dict[str, Rate]:
    """Precision and recall of `predicted` against `truth` (say, the judge against the oracle)."""
    pairs = list(zip(predicted, truth))
    return {
        "precision": rate(t for p, t in pairs if p),
        "recall": rate(p for p, t in pairs if t),
        "accuracy": rate(p == t for p, t in pairs),
    }


def balanced_accuracy(predicted: list[bool], truth: list[bool]) -> dict[str, Any]:
    """How well `predicted` (a judge's verdicts) separates the two classes of `truth` (the oracle's):
    the mean of the rate on true items and the rate on false ones, so that always answering one
    verdict scores 0.5 however the classes are mixed. None where a class is empty."""
    pairs = list(zip(predicted, truth))
    positives, negatives = rate(p for p, t in pairs if t), rate(not p for p, t in pairs if not t)
    value = (positives.value + negatives.value) / 2 if positives.n and negatives.n else None
    return {"value": value, "true_positive_rate": positives, "true_negative_rate": negatives}


def majority_baseline(labels: list) -> Rate:
    """Accuracy of always answering the most common label: the floor a real model must beat."""
    if not labels:
        return Rate(0, 0)
    return Rate(Counter(labels).most_common(1)[0][1], len(labels))


def two_proportion_p(better: Rate, worse: Rate) -> float:
    """One-sided p-value that `better`'s true rate exceeds `worse`'s (pooled two-proportion z-test).

    1.0 where either rate is empty or neither could differ (both 0 or both 1)."""
    if not better.n or not worse.n:
        return 1.0
    pooled = (better.k + worse.k) / (better.n + worse.n)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / better.n + 1 / worse.n))
    if spread == 0:
        return 1.0
    z = (better.value - worse.value) / spread
    return 0.5 * math.erfc(z / math.sqrt(2))


def mcnemar_p(first: list[bool], second: list[bool]) -> float:
    """Two-sided exact McNemar p-value for paired outcomes (the same items scored twice).

    Only the discordant items count: b where only `first` is right, c where only `second` is;
    under the null each is a fair coin, so p = P(Binomial(b + c, 1/2) as far from even). 1.0
    where no item differs."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes must be the same length, not {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


LAST_STEP = "the last step"  # the answer that names each chain's own last step


def answer_spread(answers: list, last_steps: list[int] | None = None) -> dict[str, float | int | str | None]:
    """How varied a model's answers are: entropy in bits, the most common answer and its share.
    A model that says the same thing to every item (a collapse) has entropy 0 and share 1.

    With `last_steps` (each item's last step, as its answers count steps) "the last step" counts as
    one answer too: a model that names every chain's last step says one thing to every item, though
    its step numbers vary. Its share is `last_step_share`, and it is the most common answer where it
    is commoner than any step number."""
    if not answers:
        return {"n": 0, "entropy_bits": None, "top_answer": None, "top_share": None}
    counts = Counter(answers)
    total = len(answers)
    entropy = -sum(k / total * math.log2(k / total) for k in counts.values())
    top_count = max(counts.values())
    # A tie goes to the least by repr, not to whichever came first: the items' order is not the answer.
    top = min((a for a, k in counts.items() if k == top_count), key=repr)
    spread = {"n": total, "entropy_bits": entropy + 0.0, "top_answer": top, "top_share": top_count / total}
    if last_steps is not None:
        spread["last_step_share"] = sum(a == last for a, last in zip(answers, last_steps, strict=True)) / total
        if spread["last_step_share"] > spread["top_share"]:
            spread["top_answer"], spread["top_share"] = LAST_STEP, spread["last_step_share"]
    return spread
