"""Where first errors lie: the share at a chain's last step, and the first-error steps, in the
control's training chains for each `--positions` mode, beside the committed GSM8K splits.

    .venv/bin/python scripts/error_positions.py --size 1000 balanced natural pairs
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from misstep import inputs
from misstep.data.records import Chain
from misstep.data.splits import load_split, split_path
from misstep.optimize.control import POSITION_MODES, POSITIONS, control_chains, training_pool


def described(chains: list[Chain]) -> str:
    wrong = [c for c in chains if c.mistake_index is not None]
    last = sum(c.mistake_index == len(c.steps) - 1 for c in wrong)
    steps = Counter(min(c.mistake_index, POSITIONS - 1) + 1 for c in wrong)
    by_step = ", ".join(f"{s if s < POSITIONS else f'{s}+'}: {steps[s]}" for s in sorted(steps))
    questions = len({c.question for c in chains})
    return f"{last}/{len(wrong)} = {last / len(wrong):.3f} at the last step; steps {by_step}; {questions} questions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modes", nargs="*", help=f"of {', '.join(POSITION_MODES)} (default: every one)")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split in ("validation", "test"):
        print(f"split {split}: {described([item.chain for item in load_split(split_path('gsm8k', split))])}")
    pool = training_pool(inputs.chains_of(args.data))
    for mode in args.modes or POSITION_MODES:
        print(f"{mode} ({args.size}): {described(control_chains(pool, args.size, seed=args.seed, positions=mode))}")


if __name__ == "__main__":
    main()
