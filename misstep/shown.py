"""What the commands print: rich tables of a run's results, read from what the run returned or wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from misstep.metrics.stats import rate_text

console = Console()


def show_generation(summary: dict[str, Any], run_dir: Path) -> None:
    """`generate`'s stages (parsed, unparsable, skipped) and the oracle's checks of its scenarios."""
    table = Table(title="stages")
    for column in ("stage", "parsed", "unparsable", "skipped", "other errors"):
        table.add_column(column)
    for stage, counts in summary["stages"].items():
        table.add_row(stage, *(str(counts[k]) for k in ("parsed", "unparsable", "skipped", "other_errors")))
    console.print(table)
    checks = Table(title="ground truth (oracle)")
    checks.add_column("check")
    checks.add_column("rate [95% CI]")
    for key, label in (
        ("injection_ok", "stage 2 put the first error where stage 1 said"),
        ("location_ok", "stage 3 found the true first error"),
        ("recovery_ok", "stage 4 reached the right answer"),
    ):
        checks.add_row(label, rate_text(summary[key]))
    for key in ("precision", "recall"):
        checks.add_row(f"judge {key} vs oracle", rate_text(summary["judge"][key]))
    console.print(checks)
    console.print(f"scenarios: {run_dir / 'scenarios.jsonl'}")


def show_evaluation(metrics: dict[str, Any], run_dir: Path) -> None:
    """`evaluate`'s accuracy per task, beside both floors."""
    table = Table(title="self-correction, 95% Wilson intervals")
    for column in (
        "task",
        "n",
        "location accuracy",
        "majority baseline",
        "last-step baseline",
        "parsed",
        "recovery success",
    ):
        table.add_column(column)
    for task, row in metrics.items():
        if task.startswith("_"):
            continue
        table.add_row(
            task,
            str(row["n"]),
            rate_text(row["location_accuracy"]),
            rate_text(row["majority_baseline"]),
            rate_text(row["last_step_baseline"]),
            rate_text(row["locate_parsed"]),
            rate_text(row["recovery_success"]),
        )
    console.print(table)
    console.print(f"metrics: {run_dir / 'metrics.json'}")


def show_compile(history: list[dict[str, Any]], warmed_up: bool, run: Path, report: Path) -> None:
    """`compile`'s held-out figures at round 0 and after, the floors, and where the weights are."""
    table = Table(title="held-out GSM8K (injected errors), 95% Wilson intervals")
    for column in ("", "location accuracy", "recovery success"):
        table.add_column(column)
    for row in history:
        measured = row["heldout"]["gsm8k"]["gsm8k"]
        label = "after compile" if row["round"] else ("after warm-up" if warmed_up else "before (base + demos)")
        table.add_row(label, rate_text(measured["location_accuracy"]), rate_text(measured["recovery_success"]))
    console.print(table)
    floors = history[0]["heldout"]["gsm8k"]["gsm8k"]
    console.print(
        f"floors on the same items: majority label {rate_text(floors['majority_baseline'])}, "
        f"last step {rate_text(floors['last_step_baseline'])}"
    )
    compiled = json.loads((run / "round-1" / "compile_report.json").read_text())
    console.print(f"bootstrap: {compiled.get('bootstrap')}")
    console.print(f"weights: {compiled['model_dir']}\nprogram: {run / 'round-1' / 'program.json'}")
    console.print(f"report: {report}")


def show_splits(built: dict[str, dict[str, list]], out: Path) -> None:
    """`splits`' files: items and valid chains (answer "no mistake") per set and split."""
    table = Table("set", "split", "items", "no mistake", "file")
    for name, splits in built.items():
        for split, items in splits.items():
            valid = sum(item.chain.mistake_index is None for item in items)
            table.add_row(name, split, str(len(items)), str(valid), str(out / f"{name}-{split}.jsonl"))
    console.print(table)


def show_control_run(result: dict[str, Any]) -> None:
    """One control run's line: correct of n, both floors, and McNemar's p against the better one."""
    console.print(
        f"  {result['correct']}/{result['heldout_n']} correct; majority baseline "
        f"{result['majority_baseline_correct']}, last step {result['last_step_baseline_correct']}; "
        f"McNemar p against the better: {result['mcnemar_p']:.3g}"
    )
