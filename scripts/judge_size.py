"""Does the frozen judge separate good recoveries from bad ones when it is trained on more ground truth,
or for longer?

An arms run's frozen judge (16 ground-truth pairs in configs/arms.toml, one epoch) answered one
verdict for every recovery of the gap's verification set (balanced accuracy 0.5), for every
scenario of round 1, and for every one of its own 32 training examples. This trains the same judge
again from the base model on the run's own judge training records plus `N - 16` more pairs made the
same way (optimize/judge_data.py: a success and a failure per injected chain, the failure a recovery
the base model wrote where it wrote one that the oracle rejects), for `--epochs` (default: the
run's), and scores each judge on its own training examples (does it fit them at all?) and on the
run's verification set (`verification-set.json`), which none of its chains reach:

    .venv/bin/python scripts/judge_size.py runs/arms --pairs 64 --pairs 256 --out runs/judge-size
    .venv/bin/python scripts/judge_size.py runs/arms --pairs 16 --epochs 8 --out runs/judge-size

Writes OUT/pairs-N[-epochs-E]/ (the judge's training, its verdicts) and OUT/judge_size.json (rows
of earlier invocations kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misstep.data import load_chains  # noqa: E402
from misstep.data.runfiles import write_json_atomic  # noqa: E402
from misstep.data.splits import load_split, split_path, without_heldout  # noqa: E402
from misstep.inputs import model_dir  # noqa: E402
from misstep.lm.provider import LocalProvider  # noqa: E402
from misstep.optimize.compile import warm_up  # noqa: E402
from misstep.optimize.config import load_config  # noqa: E402
from misstep.optimize.demos import ground_truth_demos  # noqa: E402
from misstep.optimize.judge_data import composition, injected_pairs, judge_examples, written_failures  # noqa: E402
from misstep.optimize.rounds import judge_training  # noqa: E402
from misstep.optimize.verification import judged, kept_set, training_fit, verdicts  # noqa: E402
from misstep.programs import Judge  # noqa: E402

RUN_PAIRS = 16  # the arms run's ground_truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pairs", type=int, action="append", required=True, help="ground-truth pairs in all")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("runs/judge-size"))
    parser.add_argument("--epochs", type=float, default=None, help="the judge's training epochs (default: the run's)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens a training record keeps (default: the run's; longer ones lose their prompt's head)",
    )
    parser.add_argument(
        "--judge-report",
        type=Path,
        default=None,
        help="compile_report.json of the judge whose records to train on (default: RUN_DIR/judge/'s; "
        "a superseded judge's while the run's is being retrained: same records, other settings)",
    )
    args = parser.parse_args()

    config = load_config(args.run_dir / "config.toml")
    settings = config.loop
    items = kept_set(args.run_dir / "verification.jsonl")

    # The run's judge was trained on these records (the other stages' ground truth and its 16 pairs).
    report = args.judge_report or args.run_dir / "judge" / "compile_report.json"
    if not report.exists():
        parser.error(f"{report}: no judge report (name one with --judge-report)")
    run_judge = Path(json.loads(report.read_text())["model_dir"])
    run_records = [json.loads(line) for line in (run_judge / "train_data.jsonl").read_text().splitlines()]
    seen = "\n".join(json.dumps(r) for r in run_records)
    measured = [item.chain for split in ("test", "validation") for item in load_split(split_path("gsm8k", split))]
    pool = without_heldout([c for c in load_chains(args.data) if c.is_valid], measured)
    demos = ground_truth_demos(pool, k=settings.demos, seed=settings.seed) if settings.demos else {}
    # New pairs from the end of the file: the run drew its demos, ground truth, judge and verification
    # chains from the front; no verification chain and no question the run's judge saw.
    reserved = {item["question"] for item in items} | {c.question for c in measured}
    spare = [c for c in reversed(pool) if c.question not in reserved and json.dumps(c.question)[1:-1] not in seen]

    # The run's compile settings, with these options where given (as the loop's judge_* settings are).
    train = judge_training(replace(settings, judge_epochs=args.epochs, judge_max_length=args.max_length), config.train)
    epochs, max_length = train.epochs, train.max_length
    provider = LocalProvider(model_dir(config.model), args.out / "checkpoints", train, engine=config.engine)
    base = provider.lm(seed=settings.seed)
    summary = args.out / "judge_size.json"
    results = json.loads(summary.read_text())["rows"] if summary.exists() else []
    try:
        for n in sorted(set(args.pairs)):
            if n < RUN_PAIRS:
                parser.error(f"--pairs {n}: the run's judge already had {RUN_PAIRS}")
            folder = args.out / (
                f"pairs-{n}"
                + (f"-epochs-{epochs:g}" if epochs != config.train.epochs else "")
                + (f"-max-length-{max_length}" if max_length != config.train.max_length else "")
            )
            pairs = injected_pairs(spare[: 2 * (n - RUN_PAIRS)], k=n - RUN_PAIRS, seed=settings.seed + 3)
            failures = written_failures(
                pairs, base, demos, folder / "written_recoveries.jsonl", num_threads=settings.num_threads
            )
            examples = judge_examples(pairs, failures)
            judge = warm_up(
                Judge(),
                {"judge": examples},
                lm=base.copy(provider=provider),
                provider=provider,
                run_dir=folder,
                extra_records=run_records,
            ).program
            said = verdicts(items, judge, folder / "verdicts.jsonl", num_threads=settings.num_threads)
            given = [said.get(item["key"]) for item in items]
            scored = judged(items, said)
            weights = Path(json.loads((folder / "compile_report.json").read_text())["model_dir"])
            row = {
                "pairs": n,
                "epochs": epochs,
                "max_length": max_length,
                "training_fit": training_fit(judge.predictors()[0].lm, weights),
                "new_examples": composition(examples),
                "balanced_accuracy": scored["value"],
                "true_positive_rate": scored["true_positive_rate"].to_dict(),
                "true_negative_rate": scored["true_negative_rate"].to_dict(),
                "verdicts": {str(v): given.count(v) for v in (True, False, None)},
            }
            same = (n, epochs, max_length)
            results = [r for r in results if (r["pairs"], r.get("epochs"), r.get("max_length")) != same] + [row]
            print(json.dumps(row), flush=True)
            write_json_atomic(summary, {"run": str(args.run_dir), "set": len(items), "rows": results})
    finally:
        provider.close()


if __name__ == "__main__":
    main()
