"""Both engines, the same answers: every stage of the six-stage cycle at temperature 0, constrained
(or not), on the embedded engine and on a local vLLM server, compared field by field (run by hand).

    .venv/bin/python benchmarks/engine_parity.py [--chains 20] [--no-constrained] [--vllm-python PY]

Runs `misstep.generate` (stages 1-6, two demos a stage) over the same valid GSM8K chains on each
engine and counts, per stage, the answers whose parsed fields (or, where one does not parse, raw
text) are the same on both. Writes benchmarks/results/engine_parity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import local_lm, resolve_model
from misstep.lm.client import served_lm
from misstep.lm.models import fingerprint
from misstep.lm.serving import VllmOptions, VllmServer
from misstep.optimize.demos import ground_truth_demos, questions_of
from misstep.optimize.jobs import JobSettings, generate

sys.path.insert(0, str(Path(__file__).parent))
from common import save  # noqa: E402


def stage_answers(lm, chains, demos, constrained: bool, threads: int) -> dict[str, dict[str, str]]:
    """Each chain's answer per stage (parsed fields, else raw text, else the stage's error), by source
    id."""
    with tempfile.TemporaryDirectory(prefix="misstep-parity-") as run_dir:
        settings = JobSettings(Path(run_dir), threads, demos, constrained=constrained)
        summary = generate(chains, ["arithmetic_slip"], lm, settings)
        records = [json.loads(line) for line in (Path(run_dir) / "scenarios.jsonl").read_text().splitlines()]
    print(f"{lm.model}: {summary['wall_seconds_this_run']:.0f} s")
    return {
        r["source_id"]: {
            stage: json.dumps(
                result.get("outputs") if result.get("ok") else result.get("raw") or {"error": result.get("error")},
                sort_keys=True,
            )
            for stage, result in r["stages"].items()
        }
        for r in records
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--chains", type=int, default=20)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--vllm-python", default=sys.executable)
    args = parser.parse_args()

    model_dir = resolve_model(args.model)
    pool = [c for c in misstep.load_chains(args.data) if c.is_valid]
    demos = ground_truth_demos(misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl")), k=2)
    chains = [c for c in pool if c.question not in questions_of(demos)][: args.chains]

    lm = local_lm(model_dir, cache=False, max_batch_size=args.threads, max_tokens=384)
    try:
        embedded = stage_answers(lm, chains, demos, args.constrained, args.threads)
    finally:
        lm.engine.close()
    with tempfile.TemporaryDirectory(prefix="misstep-parity-vllm-") as logs:
        options = VllmOptions(python=args.vllm_python, watch_interval=0)
        name = f"{model_dir.name}-{fingerprint(model_dir)}"
        server = VllmServer(model_dir, name, Path(logs) / "vllm.log", options).start()
        try:
            served = stage_answers(
                served_lm(server, cache=False, max_tokens=384), chains, demos, args.constrained, args.threads
            )
        finally:
            server.stop()

    same, total = Counter(), Counter()
    for source, stages in embedded.items():
        for stage, answer in stages.items():
            total[stage] += 1
            same[stage] += served.get(source, {}).get(stage) == answer
    for stage in total:
        print(f"{stage}: {same[stage]}/{total[stage]} the same on both engines")
    save(
        "engine_parity",
        args.model,
        {
            "chains": len(chains),
            "same": dict(same),
            "total": dict(total),
            "embedded": embedded,
            "vllm": served,
        },
        constrained=args.constrained,
    )


if __name__ == "__main__":
    main()
