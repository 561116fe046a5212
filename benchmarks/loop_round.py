"""One full round of the loop at a fixed small size, on the real model: wall time split by step
(the judge's and the student's warm-ups, scenarios, tuning, compile, held-out evaluation).

    .venv/bin/python benchmarks/loop_round.py [--repeats 1]

The split is what `run_loop` records in each round.json ("seconds"); this runs the loop
for one round in a fresh directory and reads it back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import local_lm, resolve_model
from misstep.lm.provider import LocalProvider
from misstep.lm.training import TrainSettings
from misstep.metrics.evaluation import injected_gsm8k
from misstep.optimize.rounds import LoopSettings, run_loop

sys.path.insert(0, str(Path(__file__).parent))
from common import save, summarize  # noqa: E402

SIZE = dict(
    rounds=1,
    seed_chains=8,
    ground_truth=4,
    tuning_trials=10,
    num_threads=8,
    error_types=["arithmetic_slip", "wrong_operand"],
    verification_chains=0,  # one round's cost as it was measured before the gap's set existed
)
HELDOUT = 8


def bench_round(model_dir: Path, repeats: int = 1) -> dict:
    train = misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl"))
    heldout = {"gsm8k": injected_gsm8k(misstep.load_chains(misstep.sample_path("gsm8k/test.jsonl")), HELDOUT)}
    splits: dict[str, list[float]] = {}
    walls = []
    for run in range(repeats):
        with tempfile.TemporaryDirectory(prefix="misstep-bench-") as folder:
            run_dir = Path(folder)
            provider = LocalProvider(
                model_dir,
                run_dir / "checkpoints",
                TrainSettings(method="full", learning_rate=1e-4, max_length=1024),
                show_progress=False,
            )
            started = time.perf_counter()
            run_loop(
                train,
                heldout,
                provider=provider,
                judge_lm=local_lm(model_dir, max_tokens=64, cache=False),
                settings=LoopSettings(**SIZE, seed=run),
                run_dir=run_dir,
            )
            walls.append(time.perf_counter() - started)
            for r in (0, 1):
                for step, seconds in json.loads((run_dir / f"round-{r}" / "round.json").read_text())["seconds"].items():
                    splits.setdefault(step if r else f"{step} (round 0)", []).append(seconds)
        print(f"round run {run + 1}: {walls[-1]:.0f} s")
    return {
        "size": {**SIZE, "heldout": HELDOUT},
        "wall_seconds": summarize(walls),
        "seconds_by_step": {step: summarize(values) for step, values in splits.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    save(
        "round",
        args.model,
        bench_round(resolve_model(args.model), args.repeats),
        constrained=LoopSettings().constrained,
    )


if __name__ == "__main__":
    main()
