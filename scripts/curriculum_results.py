"""Issue 18's comparison of seed modes from an arms run: per mode, one entry per finished round with
the difficulty of its seed chains and location on every held-out set (n, correct, McNemar's p
against round 0 on the same items), written as docs/results/curriculum.json expects.

    .venv/bin/python scripts/curriculum_results.py runs/arms --out docs/results/curriculum.json

Each mode is an arm of the run: by default curriculum = arm-judge-curriculum, uniform =
arm-judge-uniform and gsm8k = arm-judge (the judge arm on the training file's seeds); --mode
NAME=ARM names others. A mode whose arm has no finished round yet is left out, and said so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from misstep.optimize.arms_report import arm_dir, seed_mode_rows

DEFAULT_MODES = {"curriculum": "judge-curriculum", "uniform": "judge-uniform", "gsm8k": "judge"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", action="append", default=[], help="NAME=ARM (repeat); default: the three above")
    args = parser.parse_args()
    modes = dict(DEFAULT_MODES)
    if args.mode:
        try:
            modes = dict(pair.split("=", 1) for pair in args.mode)
        except ValueError:
            parser.error(f"--mode takes NAME=ARM, not {args.mode}")
    table = {}
    for mode, arm in modes.items():
        folder = arm_dir(args.run_dir, arm)
        if not (folder / "loop.json").exists():
            print(f"{mode}: {folder} has not started; left out")
            continue
        try:
            table[mode] = seed_mode_rows(folder)
        except FileNotFoundError as exc:
            print(f"{mode}: {exc}; left out")
            continue
        last = table[mode][-1]
        sets = ", ".join(f"{name} {m['correct']}/{m['n']}" for name, m in last["heldout"].items())
        print(f"{mode} ({arm}): {len(table[mode])} rounds; round {last['round']}: {sets}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "arms": modes, "modes": table}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
