"""The loop's arms: what each trains on from a round's scenarios (issue 15, being built).

So far: `balanced`, which keeps a kept set from teaching one answer far more often than the
held-out data asks it (a student trained on its own answers drifts toward a constant one).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

Item = TypeVar("Item")


def balanced(
    items: list[Item],
    label: Callable[[Item], Hashable],
    reference: Mapping[Hashable, float],
    most: float = 2.0,
    seed: int = 0,
) -> list[Item]:
    """`items` without the surplus of any label whose share of them is above `most` times its share
    of `reference` (a distribution over labels, say the held-out split's first-error steps; a label
    it lacks may not be taught at all). The surplus is drawn at random (`seed`); what stays keeps
    its order. Dropping one label's surplus raises the others' shares, so the caps are applied
    until none is exceeded."""
    total = sum(reference.values())
    share = {key: value / total for key, value in reference.items()} if total else {}
    counts = Counter(label(item) for item in items)
    kept = dict(counts)
    while True:
        n = sum(kept.values())
        caps = {key: math.floor(most * share.get(key, 0.0) * n) for key in kept}
        over = {key: caps[key] for key in kept if kept[key] > caps[key]}
        if not over:
            break
        kept.update(over)
    rng = random.Random(seed)
    dropped: set[int] = set()
    for key, count in counts.items():
        if kept[key] < count:
            positions = [i for i, item in enumerate(items) if label(item) == key]
            dropped |= set(rng.sample(positions, count - kept[key]))
    return [item for i, item in enumerate(items) if i not in dropped]
