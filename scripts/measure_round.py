"""Measure one finished round of a loop run on more held-out sets, written where the loop itself
would write (and resume) them: the procedural level sets under <round folder>/heldout/level-<k>/
(say round 0 of runs/arms, before a run with --level in that directory needs them), BIG-Bench
Mistake under <round folder>/at-best/bbm-<task>/ (where --bbm-at-best measures round 0 and each
arm's best round once the arms are done).

    .venv/bin/python scripts/measure_round.py runs/arms runs/arms/round-0 --level 1 2 3 4 5 6
    .venv/bin/python scripts/measure_round.py runs/arms runs/arms/round-0 \
        --bbm logical_deduction multistep_arithmetic word_sorting

Location only (recovery is measured on the GSM8K set alone); the run's own config.toml gives the
model, its serving and the decoding settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import misstep

misstep.offline()

from misstep import inputs  # noqa: E402
from misstep.optimize.arms_report import AT_BEST  # noqa: E402
from misstep.optimize.config import load_config  # noqa: E402
from misstep.optimize.run import measure_saved_round, run_provider  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("round_folder", type=Path, help="a round's folder holding its program.json")
    parser.add_argument("--level", type=int, nargs="+", default=[], help="procedural levels' test sets")
    parser.add_argument("--bbm", nargs="+", default=[], help="BIG-Bench Mistake tasks' test sets")
    args = parser.parse_args()
    if not args.level and not args.bbm:
        parser.error("give --level, --bbm or both")
    measured = {}
    if args.level:
        measured["heldout"] = {f"level-{k}": inputs.split_chains(None, f"level-{k}", "test") for k in args.level}
    if args.bbm:
        measured[AT_BEST] = {f"bbm-{task}": inputs.split_chains(None, task, "test") for task in args.bbm}
    config = load_config(args.run_dir / "config.toml")
    provider = run_provider(config, inputs.model_dir(config.model), args.run_dir)
    try:
        out = measure_saved_round(args.round_folder, measured, provider, config.loop)
    finally:
        provider.close()
    for kind, sets in out.items():
        for name, by_task in sets.items():
            for m in by_task.values():
                floors = f"majority {m['majority_baseline']['k']}, last step {m['last_step_baseline']['k']}"
                print(f"{kind}/{name}: {m['location_accuracy']['k']}/{m['location_accuracy']['n']} ({floors})")


if __name__ == "__main__":
    main()
