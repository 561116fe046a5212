"""The full six-stage program on the embedded engine: how much of the wall time is spent
outside the engine (DSPy formatting and parsing, threads, I/O). The goal is at most 10%.

    .venv/bin/python benchmarks/program.py [--chains 8] [--repeats 3] [--threads 8]

Each repeat runs `misstep.generate` (stages 1-6, demos in the prompts) over fresh valid
GSM8K chains on one engine; the engine counts the seconds it spent running batches, so
wall - busy is the time the engine sat waiting for the program.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import local_lm, resolve_model
from misstep.optimize.demos import ground_truth_demos, questions_of
from misstep.optimize.jobs import JobSettings, generate

sys.path.insert(0, str(Path(__file__).parent))
from common import save, summarize  # noqa: E402


def bench_program(model_dir: Path, data: Path, chains: int = 8, repeats: int = 3, threads: int = 8) -> dict:
    pool = [c for c in misstep.load_chains(data) if c.is_valid]
    demos = ground_truth_demos(pool, k=2)
    pool = [c for c in pool if c.question not in questions_of(demos)]
    if len(pool) < chains * repeats:
        raise SystemExit(f"{data}: {len(pool)} usable chains, {chains * repeats} needed")
    shares, walls, calls, batches = [], [], [], []
    for run in range(repeats):
        lm = local_lm(model_dir, cache=False, max_batch_size=threads)
        try:
            with tempfile.TemporaryDirectory(prefix="misstep-bench-") as run_dir:
                summary = generate(
                    pool[run * chains : (run + 1) * chains],
                    ["arithmetic_slip"],
                    lm,
                    JobSettings(run_dir=Path(run_dir), num_threads=threads, demos=demos),
                )
        finally:
            lm.engine.close()
        wall, engine = summary["wall_seconds_this_run"], summary["engine"]
        shares.append(1 - engine["busy_seconds"] / wall)
        walls.append(wall)
        calls.append(engine["requests"])
        batches.append(engine["batches"])
        print(
            f"program run {run + 1}: {wall:.1f} s wall, engine busy {engine['busy_seconds']:.1f} s, "
            f"{engine['requests']} calls in {engine['batches']} batches ({engine.get('joined', 0)} joined one "
            f"already decoding): {shares[-1]:.1%} outside the engine"
        )
    return {
        "chains": chains,
        "threads": threads,
        "outside_engine_share": summarize(shares),
        "wall_seconds": summarize(walls),
        "engine_calls": calls,
        "engine_batches": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=misstep.sample_path("gsm8k/train.jsonl"))
    parser.add_argument("--chains", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    save(
        "program",
        args.model,
        bench_program(resolve_model(args.model), args.data, args.chains, args.repeats, args.threads),
        constrained=JobSettings(run_dir=Path()).constrained,  # generate's default
    )


if __name__ == "__main__":
    main()
