"""The loop's arms: which of a round's self-written answers each trains stages 3 and 4 on
(`LoopSettings.keep`; `optimize.run.run_arms` runs several side by side).

Every arm teaches only what the student itself wrote; the arms differ in what admits it:

- **oracle** (the ceiling): a location where it is the oracle's first error of the written chain,
  a recovery where the oracle confirms its answer and found an error to recover from (a chain
  only reworded has none, and any steps ending in its own answer would pass);
- **judge** (the seed's cycle): a location where it is the step at which the written chain departs
  from the valid one it was written from (a label no model produces) and the judge accepted the
  recovery; a recovery the judge accepted;
- **all** (a floor): every answer that parsed;
- **random** (a floor): as many scenarios as the judge arm kept, drawn at random.

`balanced` then keeps a kept set from teaching one answer far more often than the held-out data
asks it (a student trained on its own answers drifts toward a constant one).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from misstep.data.records import Scenario
from misstep.programs.self_corrector import SelfCorrector

KEEP_ARMS = ("judge", "oracle", "all", "random")

Item = TypeVar("Item")


@dataclass(frozen=True)
class Taught:
    """What an arm teaches from one scenario (`key`: `Scenario.key`, its chain and candidate): the
    student's stage-3 answer (a 0-based step, None for "no mistake") where `location_by` admitted
    it, and its recovery where `recovery_by` did (None: not taught). `location_true` is whether the
    oracle agrees with the taught location."""

    key: str
    location: int | None = None
    location_by: str | None = None
    location_true: bool | None = None
    recovery_by: str | None = None
    recovery_true: bool | None = None


def teach(arm: str, scenarios: list[Scenario], accepted: Mapping[str, bool], seed: int = 0) -> list[Taught]:
    """What `arm` teaches from each of `scenarios` (checked by `check_scenario`); `accepted` is the
    judge's verdict on each scenario's recovery, by `Scenario.key` (after the round's thresholds)."""
    if arm not in KEEP_ARMS:
        raise ValueError(f"arm must be one of {', '.join(KEEP_ARMS)}, not {arm!r}")
    # Where the writer copied its chain there is no mistake to locate or recover from: no arm
    # teaches such a scenario as if it had one.
    written = [i for i, s in enumerate(scenarios) if not s.oracle.get("writer_failed")]
    if arm == "random":
        judged = sum(bool(t.location_by or t.recovery_by) for t in teach("judge", scenarios, accepted))
        drawn = set(random.Random(seed).sample(written, min(judged, len(written))))
        return [_taught(s, "random", i in drawn, i in drawn) for i, s in enumerate(scenarios)]
    out = []
    for index, scenario in enumerate(scenarios):
        checks, answer = scenario.oracle, _location(scenario)
        if index not in written:
            out.append(Taught(scenario.key))
        elif arm == "all":
            out.append(_taught(scenario, "all", answer is not _NONE, _recovered(scenario)))
        elif arm == "oracle":
            located = answer is not _NONE and answer == checks.get("invalid_first_error", _NONE)
            erred = checks.get("invalid_first_error") is not None
            out.append(_taught(scenario, "oracle", located, erred and bool(checks.get("recovery_ok"))))
        else:
            judged = bool(accepted.get(scenario.key))
            located = judged and answer is not _NONE and answer == checks.get("departure", _NONE)
            out.append(_taught(scenario, "judge", located, judged and _recovered(scenario)))
    return out


_NONE = object()  # no location: stage 3 did not parse, or named a step the chain does not have


def _location(scenario: Scenario) -> Any:
    result = scenario.stages.get("locate")
    if result is None or not result.ok:
        return _NONE
    index = SelfCorrector.to_index(result.outputs, len(scenario.invalid_steps))
    return _NONE if index == -1 else index


def _recovered(scenario: Scenario) -> bool:
    result = scenario.stages.get("recover")
    return result is not None and result.ok


def _taught(scenario: Scenario, by: str, location: bool, recovery: bool) -> Taught:
    answer, checks = _location(scenario), scenario.oracle
    location = location and answer is not _NONE
    recovery = recovery and _recovered(scenario)
    return Taught(
        scenario.key,
        answer if location else None,
        by if location else None,
        (answer == checks.get("invalid_first_error")) if location and "invalid_first_error" in checks else None,
        by if recovery else None,
        checks.get("recovery_ok") if recovery else None,
    )


def sources(taught: list[Taught]) -> dict[str, Any]:
    """How many labels an arm's kept set has from which source, and how many of them the oracle
    confirms (for the report)."""
    locations = [t for t in taught if t.location_by]
    recoveries = [t for t in taught if t.recovery_by]
    return {
        "locations": dict(Counter(t.location_by for t in locations)),
        "locations_true": sum(bool(t.location_true) for t in locations),
        "recoveries": dict(Counter(t.recovery_by for t in recoveries)),
        "recoveries_true": sum(bool(t.recovery_true) for t in recoveries),
    }


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
