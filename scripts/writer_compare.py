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

from misstep.metrics.stats import mcnemar_p
from misstep.optimize.report import written_chains

ERROR_TYPES = ("skipped_step", "arithmetic_slip", "misread_quantity", "wrong_operand", "wrong_operation")


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
    for scenarios in sorted(args.run_dir.glob("arm-*/round-*/scenarios.jsonl")):
        if not (scenarios.parent / "round.json").exists():
            continue  # a round still being written
        arm, r = scenarios.parent.parent.name.removeprefix("arm-"), int(scenarios.parent.name.split("-")[1])
        by_round.setdefault(r, {})[arm] = findable(scenarios)
    print(f"| round | arm | all | {' | '.join(ERROR_TYPES)} |")
    print(f"|---|---|---|{'---|' * len(ERROR_TYPES)}")
    for r, arms in sorted(by_round.items()):
        for arm, chains in arms.items():
            cells = [_found(chains, error_type) for error_type in ERROR_TYPES]
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
