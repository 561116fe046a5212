"""Answers at temperature 0, to compare two commits character for character (run by hand).

    .venv/bin/python benchmarks/same_answers.py OUT.json [--compare REFERENCE.json]

Records, on the embedded engine and the default model: the benchmark prompts of
`benchmarks/engines.py` (both workloads, eight requests at once, the first repeat's prompts)
with their answers, and every stage's raw answer of `misstep generate --chains 8` (run as a
user runs it, through the command line). A change that must not change behaviour (a
refactor) is checked by running this at the commit before it and after it:

    git worktree add /tmp/before <commit> && (cd /tmp/before && ln -s /work/main/.venv .venv &&
        .venv/bin/python benchmarks/same_answers.py /tmp/before.json)
    .venv/bin/python benchmarks/same_answers.py /tmp/after.json --compare /tmp/before.json

`--no-constrained` (or `--constrained`) is passed on to `misstep generate`; given neither, the
command runs as it is, so a commit from before constrained decoding runs too. The prompts are
sent as they are (no adapter, no constraint) either way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from engines import requests  # noqa: E402

MAX_TOKENS = 128
CONCURRENCY = 8


def prompt_answers() -> dict[str, list]:
    from misstep.lm import DEFAULT_MODEL, local_lm, resolve_model

    lm = local_lm(resolve_model(DEFAULT_MODEL), cache=False, max_batch_size=CONCURRENCY)
    out: dict[str, list] = {}
    try:
        for workload in ("story", "recover"):
            messages = requests(workload, CONCURRENCY, 0)
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                answers = list(pool.map(lambda m: lm(messages=m, max_tokens=MAX_TOKENS)[0], messages))
            out[workload] = [{"messages": m, "answer": a} for m, a in zip(messages, answers)]
    finally:
        lm.engine.close()
    return out


def generate_answers(constrained: bool | None = None) -> dict[str, dict[str, str | None]]:
    """Each scenario's raw answer per stage, by source id, from `misstep generate --chains 8`."""
    flag = [] if constrained is None else ["--constrained" if constrained else "--no-constrained"]
    with tempfile.TemporaryDirectory(prefix="misstep-same-") as run_dir:
        subprocess.run(
            [str(Path(sys.executable).parent / "misstep"), "generate", "--chains", "8", "--run-dir", run_dir, *flag],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        records = [json.loads(line) for line in (Path(run_dir) / "scenarios.jsonl").read_text().splitlines()]
    return {
        r["source_id"]: {stage: json.dumps(result, sort_keys=True) for stage, result in r["stages"].items()}
        for r in sorted(records, key=lambda r: r["source_id"])
    }


def compare(now: dict, reference: dict) -> int:
    """Print how many answers equal the reference's; the number that differ."""
    differ = 0
    for workload, rows in reference["prompts"].items():
        for i, (a, b) in enumerate(zip(now["prompts"][workload], rows)):
            if a != b:
                differ += 1
                print(f"differs: {workload} #{i} ({'prompt' if a['messages'] != b['messages'] else 'answer'})")
    for source, stages in reference["generate"].items():
        for stage, result in stages.items():
            if now["generate"].get(source, {}).get(stage) != result:
                differ += 1
                print(f"differs: generate {source} {stage}")
    total = sum(len(rows) for rows in reference["prompts"].values()) + sum(
        len(stages) for stages in reference["generate"].values()
    )
    print(f"{total - differ}/{total} answers the same, character for character")
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, help="a reference written by this script at another commit")
    parser.add_argument("--constrained", action=argparse.BooleanOptionalAction, help="passed on to misstep generate")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "commit": commit,
        "machine": machine(),
        "constrained": args.constrained,  # None: generate's default at that commit
        "prompts": prompt_answers(),
        "generate": generate_answers(args.constrained),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if args.compare:
        sys.exit(1 if compare(result, json.loads(args.compare.read_text())) else 0)


if __name__ == "__main__":
    main()
