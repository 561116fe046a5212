"""What each arm's writer (stages 1-2) wrote in each round: the written chains that carry a mistake
the oracle finds, by error type, and each pair of arms that wrote from the same seeds in a round
compared chain by chain (McNemar's exact p).

`misstep report` gives each arm's counts by error type ("What the model wrote"); this puts the arms
side by side and pairs them.

    .venv/bin/python scripts/writer_compare.py runs/arms
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from misstep.metrics.injector import INJECTABLE_TYPES
from misstep.metrics.stats import mcnemar_p
from misstep.optimize.arms_report import arm_dir, round_folder
from misstep.optimize.report import load_history, written_chains


def findable(scenarios: Path) -> dict[tuple[str, str], bool]:
    """(seed chain, error type) -> whether the written chain has a first error the oracle finds."""
    return {key: c.get("invalid_first_error") is not None for key, c in written_chains(scenarios).items()}


def _found(chains: dict[tuple[str, str], bool], error_type: str) -> str:
    found = [v for (_, t), v in chains.items() if t == error_type]
    return f"{sum(found)}/{len(found)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    by_round: dict[int, dict[str, dict[tuple[str, str], bool]]] = {}
    for arm in sorted(folder.name.removeprefix("arm-") for folder in args.run_dir.glob("arm-*")):
        for row in load_history(arm_dir(args.run_dir, arm))[1:]:  # finished rounds after the shared round 0
            scenarios = round_folder(args.run_dir, arm, row["round"]) / "scenarios.jsonl"
            by_round.setdefault(row["round"], {})[arm] = findable(scenarios)
    print(f"| round | arm | all | {' | '.join(INJECTABLE_TYPES)} |")
    print(f"|---|---|---|{'---|' * len(INJECTABLE_TYPES)}")
    for r, arms in sorted(by_round.items()):
        for arm, chains in arms.items():
            cells = [_found(chains, error_type) for error_type in INJECTABLE_TYPES]
            print(f"| {r} | {arm} | {sum(chains.values())}/{len(chains)} | {' | '.join(cells)} |")
    for r, arms in sorted(by_round.items()):
        for first, second in itertools.combinations(arms, 2):
            a, b = arms[first], arms[second]
            if set(a) != set(b):
                continue  # different seeds: not paired
            items = sorted(a)
            p = mcnemar_p([a[i] for i in items], [b[i] for i in items])
            print(f"round {r}: {first} {sum(a.values())} against {second} {sum(b.values())} of {len(items)}, p {p:.4f}")


if __name__ == "__main__":
    main()
