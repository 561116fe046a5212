"""Fine-tuning speed on this machine: seconds per step, tokens/s and FLOP/s against a matmul
probe of the same machine's peak, for full and LoRA training, with and without gradient
checkpointing, and each one's peak memory.

    .venv/bin/python benchmarks/training.py [--steps 4] [--repeats 2] [--max-length 512]
    .venv/bin/python benchmarks/training.py --records CHECKPOINT/train_data.jsonl --longest 4 \
        --steps 1 --repeats 1 --max-length 2048 --configs full,full+checkpointing

`--records` trains on a file of chat records instead (a compile's `train_data.jsonl`), `--longest
K` on its K longest in tokens only (the memory a long-prompt training needs; written to
`training-records.json`, not over the default benchmark's `training.json`).

Each configuration trains in a process of its own (so its peak memory is its own) on the
same ground-truth chat records, batch 4. The first step is left out of the timing (warm-up).
Model FLOPs per trained token: 6N for full training (forward 2N, backward 4N), 4N for LoRA
(no gradients for the frozen weights); recomputation under checkpointing is not counted, so
utilisation falls when it is on, as it should.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import save, summarize  # noqa: E402

CONFIGS = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def config_name(method: str, checkpointing: bool) -> str:
    return f"{method}{' + checkpointing' if checkpointing else ''}"


def longest_records(records: list[dict], k: int, model_dir: Path) -> list[dict]:
    """The `k` records with the most tokens (prompt and answer, as training tokenizes them)."""
    from transformers import AutoTokenizer

    from misstep.lm.training import TrainSettings, record_parts

    tokenizer, settings = AutoTokenizer.from_pretrained(model_dir), TrainSettings()
    sizes = [
        sum(len(part) for part in record_parts(tokenizer, record, n, settings)[:2]) for n, record in enumerate(records)
    ]
    order = sorted(range(len(records)), key=lambda n: -sizes[n])[:k]
    print(f"the {k} longest of {len(records)} records: {', '.join(str(sizes[n]) for n in order)} tokens")
    return [records[n] for n in order]


def matmul_peak(size: int = 2048, repeats: int = 10) -> dict:
    """fp32 FLOP/s of a square matrix product: what this machine's cores can do at best. The
    faster of torch's two CPU libraries: MKL (`a @ b`, torch's default) and oneDNN (what the
    embedded engine and training use on CPU; on AMD CPUs MKL can be much slower); each library's
    rate is kept."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    products = {"mkl": lambda: a @ b, "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")}
    rates: dict[str, list[float]] = {}
    for name, product in products.items():
        product()
        for _ in range(repeats):
            started = time.perf_counter()
            product()
            rates.setdefault(name, []).append(2 * size**3 / (time.perf_counter() - started))
    best = max(rates, key=lambda name: statistics.median(rates[name]))
    return {**summarize(rates[best]), "library": best, "by_library": {n: summarize(r) for n, r in rates.items()}}


def _train_once(
    model_dir: Path,
    records: Path,
    method: str,
    checkpointing: bool,
    steps: int,
    max_length: int,
    share_prefix: bool = True,
) -> dict:
    code = f"""
import json, sys
from pathlib import Path
from misstep.lm.training import TrainSettings, train_chat
records = [json.loads(l) for l in open({str(records)!r})]
settings = TrainSettings(method={method!r}, batch_size=4, max_length={max_length},
                         gradient_checkpointing={checkpointing}, epochs={steps} * 4 / len(records),
                         share_prefix={share_prefix})
out = Path(sys.argv[1])
summary = train_chat(Path({str(model_dir)!r}), records, out, settings, show_progress=False)
log = [json.loads(l) for l in open(out / "train_log.jsonl")]
print(json.dumps({{"summary": summary, "log": log}}))
"""
    with tempfile.TemporaryDirectory(prefix="misstep-bench-") as out:
        done = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_training(
    model_dir: Path,
    steps: int = 4,
    repeats: int = 2,
    max_length: int = 512,
    records: list[dict] | None = None,
    configs: list[tuple[str, bool]] = CONFIGS,
) -> dict:
    """Each of `configs` trained `repeats` times for `steps` steps on `records` (the sample's
    ground-truth chat records where None)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from misstep.optimize.demos import ground_truth_chat_data, ground_truth_demos
    from misstep.programs import SelfCorrector

    with torch.device("meta"):
        params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters()
        )
    if records is None:
        chains = misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl"))
        records = ground_truth_chat_data(SelfCorrector(), ground_truth_demos(chains, k=2 * steps))[: 4 * steps]
    peak = matmul_peak()
    print(
        f"matmul probe: {peak['median'] / 1e9:.1f} GFLOP/s median (fp32, 2048^3, {peak['library']}; "
        + ", ".join(f"{n} {r['median'] / 1e9:.1f}" for n, r in peak["by_library"].items())
        + ")"
    )
    results = {
        "parameters": params,
        "steps": steps,
        "batch_size": 4,
        "max_length": max_length,
        "records": len(records),
        "matmul_peak_flops": peak,
        "configs": {},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as data:
        data.write("".join(json.dumps(r) + "\n" for r in records))
        data.flush()
        for method, checkpointing in configs:
            step_seconds, token_rates, flop_rates, peaks = [], [], [], []
            for _ in range(repeats):
                run = _train_once(model_dir, Path(data.name), method, checkpointing, steps, max_length)
                timed = run["log"][1:] or run["log"]  # the first step warms up
                seconds = sum(row["seconds"] for row in timed)
                tokens = sum(row["tokens"] for row in timed)
                step_seconds.append(seconds / len(timed))
                token_rates.append(tokens / seconds)
                flop_rates.append((6 if method == "full" else 4) * params * tokens / seconds)
                peaks.append(run["summary"]["peak_rss_gib"])
            name = config_name(method, checkpointing)
            row = {
                "seconds_per_step": summarize(step_seconds),
                "tokens_per_second": summarize(token_rates),
                "model_flops": summarize(flop_rates),
                "peak_rss_gib": summarize(peaks),
            }
            row["utilisation_median"] = row["model_flops"]["median"] / peak["median"]
            results["configs"][name] = row
            print(
                f"{name}: {row['seconds_per_step']['median']:.1f} s/step, "
                f"{row['tokens_per_second']['median']:.0f} tok/s, {row['model_flops']['median'] / 1e9:.1f} GFLOP/s "
                f"({row['utilisation_median']:.0%} of the matmul probe), peak RSS {max(peaks):.1f} GiB"
            )
    return results


def bench_shared_prefix(model_dir: Path, steps: int = 4, repeats: int = 2) -> dict:
    """Stage-3 records (the control's, one adapter prompt for all), full fine-tune, with the
    shared prefix run once per batch and once per row, in alternating order."""
    from misstep.optimize.control import control_chains, training_records

    chains = misstep.load_chains(misstep.sample_path("gsm8k/train.jsonl"))
    records = training_records(control_chains(chains, 4 * steps), cue=False, loss="stage3")
    rates: dict[str, list[float]] = {"per row": [], "shared": []}
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as data:
        data.write("".join(json.dumps(r) + "\n" for r in records))
        data.flush()
        for _ in range(repeats):
            for name, share in (("per row", False), ("shared", True)):
                log = _train_once(model_dir, Path(data.name), "full", False, steps, 1024, share_prefix=share)["log"]
                timed = log[1:] or log
                rates[name].append(sum(row["seconds"] for row in timed) / len(timed))
    result = {name: summarize(values) for name, values in rates.items()}
    print(
        f"stage-3 records, full: {result['per row']['median']:.1f} s/step with the prompt per row, "
        f"{result['shared']['median']:.1f} with the shared prefix once a batch"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--shared-prefix", action="store_true", help="only the shared-prefix A/B on stage-3 records")
    parser.add_argument("--records", type=Path, help="chat records (JSONL) to train on instead")
    parser.add_argument("--longest", type=int, help="only the K longest of --records, in tokens")
    names = {config_name(*config).replace(" ", ""): config for config in CONFIGS}
    parser.add_argument("--configs", default=",".join(names), help=f"comma-separated, of {', '.join(names)}")
    args = parser.parse_args()
    unknown = [name for name in args.configs.split(",") if name not in names]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    configs = [names[name] for name in args.configs.split(",")]
    if args.longest is not None and args.records is None:
        parser.error("--longest needs --records")
    if args.shared_prefix:
        save(
            "training_shared_prefix",
            args.model,
            bench_shared_prefix(resolve_model(args.model), args.steps, args.repeats),
        )
        return
    model_dir = resolve_model(args.model)
    records = None
    if args.records is not None:
        from misstep.data.tables import read_jsonl

        records = [record for _, record in read_jsonl(args.records)]
        if args.longest is not None:
            records = longest_records(records, args.longest, model_dir)
    result = bench_training(model_dir, args.steps, args.repeats, args.max_length, records, configs)
    if args.records is not None:
        result["records_file"] = str(args.records)
        result["longest"] = args.longest
    save("training-records" if args.records is not None else "training", args.model, result)


if __name__ == "__main__":
    main()
