"""Measure one finished round of a loop run on more held-out sets, written where the loop itself
would write (and resume) them, <round folder>/heldout/<set>/: say round 0 of runs/arms on the
procedural level sets, before a run with --level in that directory needs them.

    .venv/bin/python scripts/measure_round.py runs/arms runs/arms/round-0 --level 1 2 3 4 5 6

Location only (recovery is measured on the GSM8K set alone); the run's own config.toml gives the
model, its serving and the decoding settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import misstep

misstep.offline()

from misstep import inputs  # noqa: E402
from misstep.optimize.config import load_config  # noqa: E402
from misstep.optimize.run import measure_saved_round, run_provider  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("round_folder", type=Path, help="a round's folder holding its program.json")
    parser.add_argument("--level", type=int, nargs="+", required=True, help="procedural levels' test sets")
    args = parser.parse_args()
    config = load_config(args.run_dir / "config.toml")
    provider = run_provider(config, inputs.model_dir(config.model), args.run_dir)
    sets = {f"level-{k}": inputs.split_chains(None, f"level-{k}", "test") for k in args.level}
    try:
        out = measure_saved_round(args.round_folder, {"heldout": sets}, provider, config.loop)
    finally:
        provider.close()
    for name, by_task in out["heldout"].items():
        for m in by_task.values():
            floors = f"majority {m['majority_baseline']['k']}, last step {m['last_step_baseline']['k']}"
            print(f"{name}: {m['location_accuracy']['k']}/{m['location_accuracy']['n']} ({floors})")


if __name__ == "__main__":
    main()
