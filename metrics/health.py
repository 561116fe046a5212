"""Loop health: is the self-improvement loop still improving, has it plateaued, or is it collapsing?

Two kinds of evidence, both on what the loop never trains on or cannot fake:
- held-out accuracy per round (a `Rate`), compared round against round with a
  one-sided two-proportion test, so noise on a few hundred examples is not read as
  progress or decline;
- the diversity of what was kept (distinct n-grams, near-duplicates): a loop that
  feeds on its own output collapses into repeating itself, and diversity falls first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import combinations

from misstep.metrics.stats import Rate, two_proportion_p

_WORD = re.compile(r"\w+|[^\w\s]")


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float | None:
    """Unique n-grams over all n-grams of `texts` (Li et al. 2016); None when there are none."""
    grams = [g for text in texts for g in _ngrams(text, n)]
    return len(set(grams)) / len(grams) if grams else None


def near_duplicate_rate(texts: list[str], threshold: float = 0.8, n: int = 3) -> float | None:
    """Share of texts with another text whose word n-gram sets overlap by Jaccard >= `threshold`.

    Quadratic in the number of texts, which is fine for the hundreds a round keeps."""
    if len(texts) < 2:
        return None
    shingles = [set(_ngrams(t, n)) or {tuple(_WORD.findall(t.lower()))} for t in texts]
    duplicated = set()
    for i, j in combinations(range(len(texts)), 2):
        union = len(shingles[i] | shingles[j])
        if union and len(shingles[i] & shingles[j]) / union >= threshold:
            duplicated.update((i, j))
    return len(duplicated) / len(texts)


def diversity(texts: list[str]) -> dict[str, float | int | None]:
    return {
        "texts": len(texts),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "near_duplicates": near_duplicate_rate(texts),
    }


@dataclass(frozen=True)
class StopRule:
    """When the loop stops, in one place.

    - collapse: the latest round is significantly worse (p < `alpha`) than the best
      round so far, or its kept set's distinct-2 fell below `min_diversity_ratio` of the
      first round's, or its most common stage-3 answer covers more than `max_top_share` of the
      held-out items and more than in the round before;
    - plateau: no round in the last `patience` rounds was significantly better than the
      best before it.

    With `fixed_budget` the verdict is still given every round but stops nothing: the run goes on to
    its last round, as a comparison of arms at the same budget needs.
    """

    patience: int = 2
    alpha: float = 0.05
    min_diversity_ratio: float = 0.7
    # One stage-3 answer given to more than this share of the held-out items is flagged; it is a
    # collapse when it is also more than the round before gave (so a degenerate round 0 is flagged
    # in the report, not a reason to stop after round 1).
    max_top_share: float = 0.6
    fixed_budget: bool = False

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be at least 1, not {self.patience}")


@dataclass(frozen=True)
class Verdict:
    stop: bool
    reason: str  # "continue", "plateau" or "collapse" (which stops nothing under a fixed budget)
    best_round: int
    detail: str


def judge_health(
    accuracy: list[Rate],
    distinct_2: list[float | None],
    rule: StopRule = StopRule(),
    top_share: list[float | None] | None = None,
) -> Verdict:
    """The stop rule over a history (one entry per finished round, round 0 = before any training).

    `accuracy` is the primary held-out metric per round; `distinct_2` the kept set's
    distinct-2 per round (None where nothing was kept); `top_share` the share of held-out items
    given the round's most common stage-3 answer (None where unknown)."""
    verdict = _verdict(accuracy, distinct_2, rule, top_share)
    if verdict.stop and rule.fixed_budget:
        return replace(verdict, stop=False, detail=f"{verdict.detail}; a fixed budget: the run goes on")
    return verdict


def _verdict(
    accuracy: list[Rate], distinct_2: list[float | None], rule: StopRule, top_share: list[float | None] | None
) -> Verdict:
    if not accuracy:
        raise ValueError("no rounds to judge")
    best = max(range(len(accuracy)), key=lambda r: (accuracy[r].value if accuracy[r].n else -1.0, -r))
    latest = len(accuracy) - 1
    p_drop = two_proportion_p(accuracy[best], accuracy[latest]) if best != latest else 1.0
    if p_drop < rule.alpha:
        return Verdict(
            True,
            "collapse",
            best,
            f"round {latest} accuracy {accuracy[latest]} is below round {best}'s "
            f"{accuracy[best]} (one-sided p={p_drop:.3g})",
        )
    shares = top_share or []
    if (
        latest >= 1
        and len(shares) > latest
        and shares[latest] is not None
        and shares[latest] > rule.max_top_share
        and shares[latest - 1] is not None
        and shares[latest] > shares[latest - 1]
    ):
        return Verdict(
            True,
            "collapse",
            best,
            f"round {latest} gives one stage-3 answer to {shares[latest]:.0%} of "
            f"the held-out items (above {rule.max_top_share:.0%}, and up from "
            f"{shares[latest - 1]:.0%})",
        )
    seen = [d for d in distinct_2 if d is not None]
    if len(seen) >= 2 and distinct_2[latest] is not None and distinct_2[latest] < rule.min_diversity_ratio * seen[0]:
        return Verdict(
            True,
            "collapse",
            best,
            f"kept-set distinct-2 fell to {distinct_2[latest]:.3f} from "
            f"{seen[0]:.3f} (below {rule.min_diversity_ratio:.0%})",
        )
    if latest >= rule.patience:
        gains = []
        for r in range(latest - rule.patience + 1, latest + 1):
            earlier = max(accuracy[:r], key=lambda a: a.value if a.n else -1.0)
            gains.append(two_proportion_p(accuracy[r], earlier) < rule.alpha)
        if not any(gains):
            return Verdict(
                True,
                "plateau",
                best,
                f"no significant gain (p < {rule.alpha}) in the last "
                f"{rule.patience} rounds; best is round {best}: {accuracy[best]}",
            )
    return Verdict(False, "continue", best, f"best so far is round {best}: {accuracy[best]}")
