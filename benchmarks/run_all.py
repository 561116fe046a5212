"""Every benchmark in one command: engines side by side, the full program's overhead, fine-tuning
speed against the machine's peak, and one round split by step. Run by hand on an idle machine:

    .venv/bin/python benchmarks/run_all.py [--vllm-python /path/to/python/with/vllm] [--repeats 3]
        [--llamacpp-python /path/to/python/with/llama-cpp-python --gguf q4_1=FILE --gguf f32=FILE]
        [--only engines,program,training,round]

Writes benchmarks/results/latest.json and latest.md (the table the README shows), each with
the machine, the versions and the date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import misstep

misstep.offline()  # before anything below imports DSPy (and LiteLLM)

from misstep.lm import resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from engines import CONCURRENCY, bench_engines, parse_gguf  # noqa: E402
from loop_round import bench_round  # noqa: E402
from program import bench_program  # noqa: E402
from training import bench_training  # noqa: E402

PARTS = ("engines", "program", "training", "round")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"# misstep benchmarks, {m['date']}",
        "",
        f"{results['model']} on {m['cpu']} ({m['cpus']} CPUs{', ' + m['gpu'] if m['gpu'] else ''}); "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
        "Medians of the repeats (min in brackets; for times, lower is better).",
        "",
    ]
    engines = results.get("engines")
    if engines:
        names = [n for n in ("embedded-plain", "embedded", "vllm") if n in engines] + sorted(
            n for n in engines if n.startswith("llamacpp-")
        )
        lines += [
            f"## Engines (up to {engines['max_tokens']} new tokens, fp32)",
            "",
            "| concurrency | "
            + " | ".join(f"{n} story tok/s | {n} recover tok/s | {n} first token ms" for n in names)
            + " |",
            "|---|" + "---|---|---|" * len(names),
        ]
        for c in CONCURRENCY:
            cells = []
            for n in names:
                row = engines[n].get(f"concurrency_{c}")
                if row is None:  # llama.cpp serves one request at a time
                    cells += ["–"] * 3
                    continue
                tps, rec, ttft = row["tokens_per_second"], row["recover_tokens_per_second"], row["ttft_seconds"]
                cells += [
                    f"{tps['median']:.1f} [{tps['min']:.1f}]",
                    f"{rec['median']:.1f} [{rec['min']:.1f}]",
                    f"{ttft['median'] * 1e3:.0f} [{ttft['min'] * 1e3:.0f}]",
                ]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        if "vllm" in engines:

            def ratio(c: int, key: str) -> float:
                return (
                    engines["embedded"][f"concurrency_{c}"][key]["median"]
                    / engines["vllm"][f"concurrency_{c}"][key]["median"]
                )

            lines += [
                "",
                "embedded-plain: the embedded engine on transformers' own kernels, without "
                "prompt-lookup speculation; "
                f"vLLM server start: {engines['vllm']['start_seconds']:.1f} s. Embedded / vLLM: story "
                + ", ".join(f"{ratio(c, 'tokens_per_second'):.2f} at {c}" for c in CONCURRENCY)
                + "; recover "
                + ", ".join(f"{ratio(c, 'recover_tokens_per_second'):.2f} at {c}" for c in CONCURRENCY)
                + ".",
            ]
        for n in names:
            if n.startswith("llamacpp-"):
                one = engines[n]["concurrency_1"]
                own = engines["embedded"]["concurrency_1"]
                story, recover = (
                    own[key]["median"] / one[key]["median"]
                    for key in ("tokens_per_second", "recover_tokens_per_second")
                )
                lines += [
                    "",
                    f"{n}: llama.cpp (llama-cpp-python) on {engines[n]['gguf']}, {engines[n]['threads']} "
                    f"threads, one request at a time. Embedded / it at 1: story {story:.2f}, recover {recover:.2f}.",
                ]
        same = {n: engines[n]["same_answers_as_plain"] for n in names if "same_answers_as_plain" in engines[n]}
        if same:
            lines += [
                "",
                "Answers at temperature 0 identical to embedded-plain's, character for character: "
                + "; ".join(f"{n} {s['identical']}/{s['of']}" for n, s in same.items())
                + ".",
            ]
        lines.append("")
    program = results.get("program")
    if program:
        share = program["outside_engine_share"]
        lines += [
            "## The six-stage program on the embedded engine",
            "",
            f"{program['chains']} chains, {program['threads']} threads: {share['median']:.1%} of the wall time "
            f"outside the engine (min {share['min']:.1%}; goal <= 10%); "
            f"{program['wall_seconds']['median']:.0f} s a run.",
            "",
        ]
    training = results.get("training")
    if training:
        probe = training["matmul_peak_flops"]
        peak = probe["median"]
        libraries = ", ".join(f"{n} {r['median'] / 1e9:.1f}" for n, r in probe.get("by_library", {}).items())
        lines += [
            f"## Fine-tuning (batch {training['batch_size']}, max length {training['max_length']}, "
            f"{training['parameters'] / 1e6:.0f}M parameters)",
            "",
            f"Matmul probe (fp32 2048^3): {peak / 1e9:.1f} GFLOP/s"
            + (
                f", the faster of torch's libraries ({libraries}); training's products run on oneDNN "
                "(`TrainSettings.onednn`)."
                if libraries
                else "."
            ),
            "",
            "| configuration | s/step | tokens/s | model GFLOP/s | of the probe | peak RSS GiB |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in training["configs"].items():
            lines.append(
                f"| {name} | {row['seconds_per_step']['median']:.2f} [{row['seconds_per_step']['min']:.2f}] "
                f"| {row['tokens_per_second']['median']:.0f} | {row['model_flops']['median'] / 1e9:.1f} "
                f"| {row['utilisation_median']:.0%} | {row['peak_rss_gib']['max']:.1f} |"
            )
        lines.append("")
    round_ = results.get("round")
    if round_:
        size = round_["size"]
        lines += [
            f"## One round ({size['seed_chains']} seed chains, {size['heldout']} held out, "
            f"{size['ground_truth']} ground-truth examples per stage)",
            "",
            f"Wall time {round_['wall_seconds']['median']:.0f} s, round 0 included.",
            "",
            "| step | seconds | share |",
            "|---|---|---|",
        ]
        total = sum(v["median"] for v in round_["seconds_by_step"].values())
        for step, value in round_["seconds_by_step"].items():
            lines.append(f"| {step} | {value['median']:.0f} | {value['median'] / total:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=misstep.DEFAULT_MODEL)
    parser.add_argument("--vllm-python", default=None, help="a Python that has vLLM: adds vLLM to the engines")
    parser.add_argument(
        "--llamacpp-python", default=None, help="a Python that has llama-cpp-python: adds llama.cpp on each --gguf"
    )
    parser.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a GGUF file of the model for llama.cpp (repeatable), e.g. q4_1=... f32=...",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument(
        "--merge", action="store_true", help="keep the parts not run from the last latest.json (a rerun of one part)"
    )
    args = parser.parse_args()
    parts = args.only.split(",")
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from {', '.join(PARTS)}")
    model_dir = resolve_model(args.model)
    out = Path(__file__).parent / "results"
    results: dict = json.loads((out / "latest.json").read_text()) if args.merge else {}
    results.update({"machine": machine(), "model": args.model})
    ggufs = dict(parse_gguf(g) for g in args.gguf)
    engines = (
        ["embedded-plain", "embedded"]
        + (["vllm"] if args.vllm_python else [])
        + ([f"llamacpp-{name}" for name in ggufs] if args.llamacpp_python else [])
    )
    runs = {
        "engines": lambda: bench_engines(
            model_dir,
            engines,
            args.repeats,
            vllm_python=args.vllm_python or sys.executable,
            llamacpp_python=args.llamacpp_python,
            ggufs=ggufs,
        ),
        "program": lambda: bench_program(model_dir, misstep.sample_path("gsm8k/train.jsonl"), repeats=args.repeats),
        "training": lambda: bench_training(model_dir, repeats=max(1, args.repeats - 1)),
        "round": lambda: bench_round(model_dir),
    }
    for part in (p for p in PARTS if p in parts):
        results[part] = runs[part]()
        # written after every part: a later part that fails loses nothing already measured
        (out / "latest.json").write_text(json.dumps(results, indent=2))
        (out / "latest.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'latest.json'} and {out / 'latest.md'}")


if __name__ == "__main__":
    main()
