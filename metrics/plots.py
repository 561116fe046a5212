"""PNG evidence for a run directory, readable without running anything (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _bars(ax, labels: list[str], rates: list[dict], offset: float, width: float, label: str) -> None:
    values = [r["value"] if r["n"] else 0.0 for r in rates]
    low = [v - r["low"] if r["n"] else 0.0 for v, r in zip(values, rates)]
    high = [r["high"] - v if r["n"] else 0.0 for v, r in zip(values, rates)]
    ax.bar([i + offset for i in range(len(labels))], values, width, yerr=[low, high], capsize=3, label=label)


def plot_evaluation(metrics: dict[str, Any], path: Path) -> Path:
    """Location accuracy beside the majority and last-step baselines, and recovery success, per task,
    with 95% intervals."""
    tasks = [t for t in metrics if not t.startswith("_")]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) + 2), 4))
    series = [
        ("location_accuracy", "location accuracy"),
        ("majority_baseline", "majority baseline"),
        ("last_step_baseline", "last-step baseline"),
        ("recovery_success", "recovery success"),
    ]
    width = 0.8 / len(series)
    for n, (key, label) in enumerate(series):
        _bars(ax, tasks, [metrics[t][key] for t in tasks], (n - (len(series) - 1) / 2) * width, width, label)
    ax.set_xticks(range(len(tasks)), [f"{t}\n(n={metrics[t]['n']})" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (95% Wilson interval)")
    ax.legend(fontsize=8)
    ax.set_title("self-correction against ground-truth labels")
    return _save(fig, path)


def plot_generation(summary: dict[str, Any], path: Path) -> Path:
    """Per stage: how many answers parsed, failed to parse or were skipped."""
    stages = list(summary["stages"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(stages)
    for key in ("parsed", "unparsable", "skipped", "other_errors"):
        counts = [summary["stages"][s][key] for s in stages]
        ax.bar(stages, counts, bottom=bottom, label=key.replace("_", " "))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_ylabel(f"scenarios (of {summary['scenarios']})")
    ax.legend(fontsize=8)
    ax.set_title("what each stage produced")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
