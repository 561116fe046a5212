"""`misstep report RUN_DIR`: a markdown report of a loop's run, with PNG plots, from its files alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from misstep.data.runfiles import read_records  # noqa: E402
from misstep.metrics.health import StopRule  # noqa: E402
from misstep.metrics.stats import rate, rate_text  # noqa: E402


def finished_rounds(run_dir: Path) -> list[Path]:
    """The folders of the finished rounds (those with a round.json) in order; round 0 from the folder
    the loop started from (loop.json's `start_dir`, for an arm of a shared start) when it is not in
    `run_dir`."""
    folders = sorted(run_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    loop_file = run_dir / "loop.json"
    start_dir = json.loads(loop_file.read_text()).get("start_dir") if loop_file.exists() else None
    if start_dir and not (run_dir / "round-0").exists():
        folders.insert(0, run_dir / start_dir / "round-0")
    finished = [folder for folder in folders if (folder / "round.json").exists()]
    if not finished:
        raise FileNotFoundError(f"{run_dir}: no finished round (round-*/round.json) to report on")
    return finished


def load_history(run_dir: Path) -> list[dict[str, Any]]:
    """The finished rounds' rows in order (`finished_rounds`)."""
    return [json.loads((folder / "round.json").read_text()) for folder in finished_rounds(run_dir)]


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _series(rows: list[dict[str, Any]], get) -> tuple[list[int], list[float], list[float], list[float]]:
    xs, values, lows, highs = [], [], [], []
    for row in rows:
        rate = get(row)
        if rate and rate.get("value") is not None:
            xs.append(row["round"])
            values.append(rate["value"])
            # A Wilson bound can sit a rounding error inside its value (k = n): no negative error bars.
            lows.append(max(0.0, rate["value"] - rate["low"]))
            highs.append(max(0.0, rate["high"] - rate["value"]))
    return xs, values, lows, highs


def _plot_rates(rows, lines: dict[str, Any], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, get in lines.items():
        xs, values, lows, highs = _series(rows, get)
        if xs:
            ax.errorbar(xs, values, yerr=[lows, highs], marker="o", capsize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:  # nothing measured yet (say, no recovery parsed): say so rather than draw an empty legend
        ax.text(0.5, 0.5, "nothing measured", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def written_chains(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """A round's model-written chains, one each (a round's candidates share their written chain),
    keyed by seed chain and error type: the error type and the oracle's checks of the chain."""
    return {
        (r["source_id"], r.get("error_type", "?")): {"error_type": r.get("error_type", "?"), **(r.get("oracle") or {})}
        for r in read_records(path)
        if not r.get("candidate")
    }


def _written(path: Path) -> dict[str, Any]:
    """Of a round's model-written chains: how many carry a mistake the oracle finds, how many carry
    it at the step the writer described (the oracle's `injection_ok`), and the first by error type
    (which mistakes the writer can write at all)."""
    chains = list(written_chains(path).values())
    found = [c.get("invalid_first_error") is not None for c in chains]
    by_type: dict[str, list[bool]] = {}
    for chain, found_in_chain in zip(chains, found):
        by_type.setdefault(chain["error_type"], []).append(found_in_chain)
    return {
        "checkable": rate(found).to_dict() if chains else None,
        "as_described": rate(bool(c.get("injection_ok")) for c in chains).to_dict() if chains else None,
        "checkable_by_type": {t: (sum(found), len(found)) for t, found in sorted(by_type.items())},
    }


_TOP_SHARE = StopRule().max_top_share


def _answer(value) -> str:
    """A stage-3 answer as a person reads it: 1-based step, "no mistake", "no such step" or unparsed."""
    if value is None:
        return "no mistake"
    if isinstance(value, int):
        return "no such step" if value < 0 else f"step {value + 1}"
    return str(value)


def _floors(metrics: dict[str, Any]) -> str:
    majority, last = metrics.get("majority_baseline"), metrics.get("last_step_baseline")
    parts = [
        f"maj. {majority['value']:.3f}" if majority and majority.get("value") is not None else None,
        f"last {last['value']:.3f}" if last and last.get("value") is not None else None,
    ]
    return "; ".join(p for p in parts if p)


def _accuracy_table(rows: list[dict[str, Any]], kind: str, tasks: list[tuple[str, str]], recovery: bool) -> list[str]:
    """One line per round: each set's location accuracy with its floors (and GSM8K recovery)."""
    head = "| round | " + " | ".join(f"{task} location (floors)" for _, task in tasks)
    lines = [
        head + (" | gsm8k recovery |" if recovery else " |"),
        "|---|" + "---|" * (len(tasks) + (1 if recovery else 0)),
    ]
    for row in rows:
        cells = []
        for name, task in tasks:
            metrics = row.get(kind, {}).get(name, {}).get(task, {})
            accuracy = metrics.get("location_accuracy")
            below = (
                accuracy
                and accuracy.get("value") is not None
                and any(
                    (metrics.get(f) or {}).get("value") is not None and accuracy["value"] < metrics[f]["value"]
                    for f in ("majority_baseline", "last_step_baseline")
                )
            )
            cells.append(f"{rate_text(accuracy)} ({_floors(metrics)})" + (" **below a floor**" if below else ""))
        recovered = row.get(kind, {}).get("gsm8k", {}).get("gsm8k", {}).get("recovery_success")
        tail = f" | {rate_text(recovered)} |" if recovery else " |"
        lines.append(f"| {row['round']} | " + " | ".join(cells) + tail)
    return lines


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report.md and its plots; return the report's path."""
    run_dir = Path(run_dir)
    rows = load_history(run_dir)
    tasks = sorted({(name, task) for row in rows for name, tasks in row["heldout"].items() for task in tasks})
    _plot_heldout_and_judge(rows, tasks, run_dir)
    _plot_diversity(rows, run_dir / "diversity.png")
    _plot_answers(rows, run_dir / "answers.png")
    _plot_levels(rows, run_dir, run_dir / "levels.png")
    lines = [f"# misstep run: {run_dir.name}", ""]
    lines += _status(run_dir, rows)
    lines += _accuracy_section(rows, tasks)
    lines += _answers_section(rows)
    lines += _kept_section(rows)
    lines += _written_section(rows, run_dir)
    lines += _curriculum_section(rows, run_dir)
    lines += _wall_time_section(rows)
    lines += _closing(run_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# -- the plots ---------------------------------------------------------------------------------------


def _plot_heldout_and_judge(rows: list[dict[str, Any]], tasks: list[tuple[str, str]], run_dir: Path) -> None:
    def heldout(name, task, metric):
        return lambda row: row["heldout"].get(name, {}).get(task, {}).get(metric)

    _plot_rates(
        rows,
        {f"{task} location": heldout(name, task, "location_accuracy") for name, task in tasks}
        | {
            "gsm8k recovery": heldout("gsm8k", "gsm8k", "recovery_success"),
            "gsm8k majority floor": heldout("gsm8k", "gsm8k", "majority_baseline"),
            "gsm8k last-step floor": heldout("gsm8k", "gsm8k", "last_step_baseline"),
        },
        "held-out accuracy (95% Wilson)",
        run_dir / "heldout.png",
    )
    _plot_rates(
        rows,
        {
            "judge precision": lambda r: r.get("judge", {}).get("precision"),
            "judge recall": lambda r: r.get("judge", {}).get("recall"),
            "acceptance": lambda r: r.get("acceptance"),
        },
        "the judge against the oracle, and what it kept",
        run_dir / "judge.png",
    )


def _plot_diversity(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("distinct_1", "distinct_2", "distinct_3", "near_duplicates"):
        points = [(r["round"], r["diversity"][key]) for r in rows if r.get("diversity", {}).get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_title("diversity of the kept recoveries")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "nothing kept", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_answers(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    points = [(r["round"], (r.get("answers") or {}).get("top_share")) for r in rows]
    points = [(x, y) for x, y in points if y is not None]
    if points:
        ax.plot(*zip(*points), marker="o", label="most common stage-3 answer's share")
    ax.axhline(_TOP_SHARE, color="red", linestyle="--", linewidth=1, label="flag")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.set_title("stage-3 answers on the held-out items")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report's sections, top to bottom ------------------------------------------------------------


def _status(run_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    """The stop rule's verdict and the best round, or where an unfinished run stands."""
    best = json.loads((run_dir / "best.json").read_text()) if (run_dir / "best.json").exists() else None
    if best:
        return [
            f"**Stop rule:** {best['verdict']['reason']} — {best['verdict']['detail']}. "
            f"**Best round:** {best['round']} (`{best['program']}`).",
            "",
        ]
    verdict = rows[-1]["verdict"]
    return [f"**Status:** unfinished; last verdict: {verdict['reason']} — {verdict['detail']}.", ""]


def _accuracy_section(rows: list[dict[str, Any]], tasks: list[tuple[str, str]]) -> list[str]:
    lines = [
        "## Held-out accuracy per round (95% Wilson intervals)",
        "",
        "Reported on the test split; each location accuracy stands beside the two floors computed on the "
        "same items: always the majority label (maj.) and always the last step (last).",
        "",
    ]
    lines += _accuracy_table(rows, "heldout", tasks, recovery=True)
    validation = sorted(
        {(name, task) for row in rows for name, tasks in row.get("validation", {}).items() for task in tasks}
    )
    if validation:
        lines += ["", "### Validation split (the stop rule and the best round are chosen here)", ""]
        return lines + _accuracy_table(rows, "validation", validation, recovery=False)
    return lines + [
        "",
        "**No validation split:** the stop rule and the best round were chosen on the reported "
        "set above, so its figures are optimistic.",
        "",
    ]


def _answers_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "### Stage-3 answers (collapse shows here)",
        "",
        f"On the set choices are made on. A most common answer above {_TOP_SHARE:.0%} of the items is "
        "flagged; a collapse for the stop rule when it also grew since the round before.",
        "",
        "| round | most common answer | its share | entropy (bits) | flag |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        answers = row.get("answers") or {}
        share = answers.get("top_share")
        flag = "**one answer dominates**" if share is not None and share > _TOP_SHARE else ""
        lines.append(
            f"| {row['round']} | {_answer(answers.get('top_answer'))} | {_number(share, 2)} "
            f"| {_number(answers.get('entropy_bits'), 2)} | {flag} |"
        )
    return lines


def _kept_section(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "![held-out accuracy](heldout.png)",
        "",
        "## The judge, the thresholds and what was kept",
        "",
        "| round | judge precision | judge recall | kept / scenarios | thresholds (confidence, quality) "
        "| distinct-2 | near-duplicates | error types kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows[1:]:
        chosen = (row.get("thresholds") or {}).get("thresholds") or {}
        thresholds = f"{chosen['min_confidence']:.2f}, {chosen['min_quality']:.2f}" if chosen else "n/a"
        judge = row.get("judge", {})
        diversity = row.get("diversity", {})
        lines.append(
            f"| {row['round']} | {rate_text(judge.get('precision'))} | {rate_text(judge.get('recall'))} "
            f"| {row.get('kept', 0)} / {row.get('scenarios', 0)} | {thresholds} "
            f"| {_number(diversity.get('distinct_2'))} | {_number(diversity.get('near_duplicates'))} "
            f"| {row.get('kept_error_types', {})} |"
        )
    return lines


def _written_section(rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    lines = [
        "",
        "### What the model wrote (stages 1-2), by the oracle",
        "",
        "| round | written chains with a mistake the oracle finds | mistake where the writer said it would be "
        "| a mistake the oracle finds, by error type |",
        "|---|---|---|---|",
    ]
    for row in rows[1:]:
        written = _written(run_dir / f"round-{row['round']}" / "scenarios.jsonl")
        by_type = ", ".join(f"{t} {k}/{n}" for t, (k, n) in written["checkable_by_type"].items())
        lines.append(
            f"| {row['round']} | {rate_text(written['checkable'])} | {rate_text(written['as_described'])} | {by_type} |"
        )
    return lines


def seed_selection(run_dir: Path, r: int) -> dict[str, Any] | None:
    """How round `r`'s procedural seed chains were chosen (None where they came from a file)."""
    path = run_dir / f"round-{r}" / "selection.json"
    return json.loads(path.read_text()).get("procedural") if path.exists() else None


def _curriculum_section(rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    chosen = [(row["round"], seed_selection(run_dir, row["round"])) for row in rows[1:]]
    chosen = [(r, how) for r, how in chosen if how]
    if not chosen:
        return []
    lines = [
        "",
        "### Seed chains' difficulty (procedural problems)",
        "",
        "The curriculum probes the model at every level, then moves one level toward the frontier (the level "
        "whose accuracy above its majority baseline is closest to half of what is left to gain).",
        "",
        "| round | selection | level | frontier | probe: correct / n vs majority, per level |",
        "|---|---|---|---|---|",
    ]
    for r, how in chosen:
        probe = "; ".join(
            f"{p['level']}: {p['correct']}/{p['n']} vs {p['majority_correct']}" for p in how.get("probe", [])
        )
        level = how.get("level", "uniform " + str(how.get("levels", {})))
        lines.append(f"| {r} | {how['selection']} | {level} | {how.get('frontier', '')} | {probe} |")
    return lines + ["", "![levels](levels.png)"]


def _seed_level(how: dict[str, Any] | None) -> float | None:
    """The level of a round's seed chains: the curriculum's choice, or the mean of the levels drawn."""
    if not how:
        return None
    if "level" in how:
        return how["level"]
    drawn = {int(level): count for level, count in how.get("levels", {}).items()}
    return sum(level * count for level, count in drawn.items()) / sum(drawn.values()) if drawn else None


def _plot_levels(rows: list[dict[str, Any]], run_dir: Path, path: Path) -> None:
    """The chosen level per round beside held-out location accuracy per level (where measured)."""
    chosen = [(row["round"], _seed_level(seed_selection(run_dir, row["round"]))) for row in rows[1:]]
    chosen = [(r, level) for r, level in chosen if level is not None]
    measured = sorted({name for row in rows for name in row["heldout"] if name.startswith("level-")})
    if not chosen and not measured:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if chosen:
        left.plot(*zip(*chosen), marker="o")
    left.set_xlabel("round")
    left.set_ylabel("level of the seed chains (mean if drawn)")
    left.grid(alpha=0.3)
    for name in measured:
        points = [
            (row["round"], row["heldout"][name]["gsm8k"]["location_accuracy"]["value"])
            for row in rows
            if name in row["heldout"]
        ]
        right.plot(*zip(*points), marker="o", label=name)
    right.set_xlabel("round")
    right.set_ylabel("held-out location accuracy")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    if measured:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wall_time_section(rows: list[dict[str, Any]]) -> list[str]:
    timed = [row for row in rows if row.get("seconds")]
    if not timed:
        return []
    steps = list(dict.fromkeys(step for row in timed for step in row["seconds"]))
    lines = [
        "",
        "### Wall time by step (seconds, in the process that ran it)",
        "",
        "| round | " + " | ".join(steps) + " | total |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for row in timed:
        cells = " | ".join(f"{row['seconds'].get(step, 0):.0f}" for step in steps)
        lines.append(f"| {row['round']} | {cells} | {sum(row['seconds'].values()):.0f} |")
    return lines


def _closing(run_dir: Path) -> list[str]:
    """The plots, what the judge's figures mean, and the settings the run ran with."""
    lines = [
        "",
        "![judge](judge.png) ![diversity](diversity.png) ![answers](answers.png)",
        "",
        "Judge precision: of the recoveries the judge called successful, the share the oracle confirms; "
        "recall: of the recoveries the oracle confirms, the share the judge called successful. "
        "Thresholds are chosen each round by Optuna on a validation slice of that round's judged "
        "scenarios (`optuna.db`).",
        "",
    ]
    loop = json.loads((run_dir / "loop.json").read_text()) if (run_dir / "loop.json").exists() else {}
    if loop:
        lines += ["## Settings", "", "```json", json.dumps(loop.get("settings", {}), indent=2), "```", ""]
    return lines
