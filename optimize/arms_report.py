"""The arms side by side: one table of every arm's rounds on the same held-out items, with each
round's paired test against the shared round 0 (RUN_DIR/arms.json, arms.md, arms.png).

    arms.json: {"arms": {"<arm>": [{"round", "split", "n", "location_correct", "recovery_n",
                "recovery_correct", "judge_balanced_accuracy", "self_judge_balanced_accuracy", "verification",
                "judge_balanced_accuracy_on_scenarios", "kept", "taught", "top_answer_share",
                "mcnemar_p_vs_round0", "predictions"}, ...]},
                "pairs": {"<arm> vs <arm>": {"rounds", "n", "location_correct", "mcnemar_p"}},
                "pairs_at_last": {the same, each arm at its last round},
                "at_best": {"<set>": {"round 0": {"n", "location_correct"}, "<arm>": {"round", "n",
                            "location_correct", "mcnemar_p_vs_round0"}}}}

Round 0 is each arm's first entry (its p null). Location is compared per item with McNemar's exact
test: against round 0 every round, and between arms at each one's best round (chosen on validation)
and at each one's last.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from misstep.data.runfiles import read_records, write_json_atomic  # noqa: E402
from misstep.metrics.stats import Rate, balanced_accuracy, mcnemar_p  # noqa: E402
from misstep.optimize.report import finished_rounds, load_history, seed_selection  # noqa: E402

HELDOUT = Path("heldout") / "gsm8k"  # the reported GSM8K set's files, inside a round's folder
AT_BEST = "at-best"  # sets measured on round 0 and each arm's best round only: <round folder>/at-best/<set>/


def arm_dir(run_dir: Path, arm: str) -> Path:
    """An arm's own rounds (not RUN_DIR/<arm>: the frozen judge's weights are RUN_DIR/judge)."""
    return run_dir / f"arm-{arm}"


def round_folder(run_dir: Path, arm: str, r: int) -> Path:
    """Where round `r` of `arm` lies: round 0 is the arms' shared start."""
    return run_dir / "round-0" if r == 0 else arm_dir(run_dir, arm) / f"round-{r}"


def arm_rows(run_dir: Path, arm: str) -> list[dict[str, Any]]:
    """One entry per finished round of `arm`, round 0 first."""
    base = _predictions(round_folder(run_dir, arm, 0))
    entries = []
    for row in load_history(arm_dir(run_dir, arm)):
        r = row["round"]
        folder = round_folder(run_dir, arm, r)
        predictions = _predictions(folder)
        recovered = [p["recovery_ok"] for p in predictions.values() if "recovery_ok" in p]
        judge = _judge_on_scenarios(folder)
        gap = row.get("verification") or {}
        paired = sorted(set(base) & set(predictions))
        entries.append(
            {
                "round": r,
                "split": "test",
                "n": len(predictions),
                "location_correct": sum(bool(p["location_ok"]) for p in predictions.values()),
                "recovery_n": len(recovered),
                "recovery_correct": sum(bool(x) for x in recovered),
                # on the fixed verification set (optimize/verification.py): the frozen judge, the
                # student's weights as judge, its own recovering of the same chains and the gap
                "judge_balanced_accuracy": gap.get("judge_balanced_accuracy"),
                "self_judge_balanced_accuracy": gap.get("self_judge_balanced_accuracy"),
                "verification": gap or None,
                # and the round's judge on the round's own scenarios
                "judge_balanced_accuracy_on_scenarios": judge,
                "kept": row.get("kept"),
                "taught": row.get("taught"),
                "top_answer_share": (row.get("answers") or {}).get("top_share"),
                "chosen_on": row.get("chosen_on"),
                "best_round": row["verdict"]["best_round"],
                # the stop rule's verdict where it found one, stopping the arm or not (a fixed budget)
                "stop": None if row["verdict"]["reason"] == "continue" else row["verdict"]["reason"],
                "mcnemar_p_vs_round0": None
                if r == 0
                else mcnemar_p(
                    [bool(base[i]["location_ok"]) for i in paired],
                    [bool(predictions[i]["location_ok"]) for i in paired],
                ),
                "predictions": str(folder / HELDOUT / "predictions.jsonl"),
                "floors": _floors(row),
                # each step's wall time, in the process that ran it (a resumed step counts its last run)
                "seconds": row.get("seconds"),
            }
        )
    return entries


def _floors(row: dict[str, Any]) -> dict[str, int | None]:
    """The reported set's two baselines, as correct answers out of its n: answering every chain with
    the majority label, and with its last step."""
    measured = row.get("heldout", {}).get("gsm8k", {}).get("gsm8k", {})  # set, then task: as report.py reads it
    return {
        "majority": (measured.get("majority_baseline") or {}).get("k"),
        "last_step": (measured.get("last_step_baseline") or {}).get("k"),
    }


def _predictions(folder: Path) -> dict[str, dict[str, Any]]:
    return {p["source_id"]: p for p in read_records(folder / HELDOUT / "predictions.jsonl")}


def _judge_on_scenarios(folder: Path) -> float | None:
    pairs = [
        (s["oracle"]["judge_verdict"], s["oracle"]["recovery_ok"])
        for s in read_records(folder / "scenarios.jsonl")
        if "judge_verdict" in s.get("oracle", {})
    ]
    return balanced_accuracy([p for p, _ in pairs], [t for _, t in pairs])["value"] if pairs else None


def compare_arms(run_dir: Path, arms: list[str]) -> dict[str, Any]:
    """Every arm's rounds, and each pair of arms compared item by item at their best rounds
    ("pairs") and at their last rounds ("pairs_at_last": each arm at its budget; where every best
    round is the shared round 0, the best rounds' comparison is of one model with itself)."""
    table = {arm: arm_rows(run_dir, arm) for arm in arms if (arm_dir(run_dir, arm) / "loop.json").exists()}
    best = {arm: rows[-1]["best_round"] for arm, rows in table.items()}
    last = {arm: rows[-1]["round"] for arm, rows in table.items()}
    return {
        "arms": table,
        "pairs": _pairs(run_dir, best),
        "pairs_at_last": _pairs(run_dir, last),
        "at_best": at_best_rows(run_dir, table),
    }


def _pairs(run_dir: Path, rounds: dict[str, int]) -> dict[str, Any]:
    """Each pair of arms, each at its round in `rounds`, on the reported GSM8K items both answered."""
    pairs = {}
    for first, second in itertools.combinations(rounds, 2):
        a, b = (_predictions(round_folder(run_dir, arm, rounds[arm])) for arm in (first, second))
        items = sorted(set(a) & set(b))
        pairs[f"{first} vs {second}"] = {
            "rounds": {first: rounds[first], second: rounds[second]},
            "n": len(items),
            "location_correct": {
                first: sum(bool(a[i]["location_ok"]) for i in items),
                second: sum(bool(b[i]["location_ok"]) for i in items),
            },
            "mcnemar_p": mcnemar_p(
                [bool(a[i]["location_ok"]) for i in items], [bool(b[i]["location_ok"]) for i in items]
            ),
        }
    return pairs


def at_best_rows(run_dir: Path, table: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The sets measured at round 0 and at each arm's best round (`run_arms(at_best=...)`): per set,
    round 0's correct answers and each arm's, with McNemar's p against round 0 on the same items."""
    base_folder = run_dir / "round-0" / AT_BEST
    if not table or not base_folder.is_dir():
        return {}
    out: dict[str, Any] = {}
    for set_folder in sorted(p for p in base_folder.iterdir() if p.is_dir()):
        base = _located(set_folder / "predictions.jsonl")
        row: dict[str, Any] = {"round 0": {"n": len(base), "location_correct": sum(base.values())}}
        for arm, rows in table.items():
            best = rows[-1]["best_round"]
            mine = _located(round_folder(run_dir, arm, best) / AT_BEST / set_folder.name / "predictions.jsonl")
            items = sorted(set(base) & set(mine))
            row[arm] = {
                "round": best,
                "n": len(mine),
                "location_correct": sum(mine.values()),
                "mcnemar_p_vs_round0": None
                if best == 0 or not items
                else mcnemar_p([base[i] for i in items], [mine[i] for i in items]),
            }
        out[set_folder.name] = row
    return out


def seed_mode_rows(loop_dir: Path) -> list[dict[str, Any]]:
    """One entry per finished round of the loop in `loop_dir` (an arm's folder, or a run of its own),
    round 0 first: what its seed chains were (`difficulty`: the curriculum's rung; `levels_drawn`: how
    many chains each level gave where levels were drawn uniformly; both None for seeds from a file) and
    location on every held-out set (`heldout`: per set n, correct and McNemar's p against round 0 on
    the same items). Issue 18's comparison of seed modes is these rows, one list per mode."""
    folders = finished_rounds(loop_dir)
    base: dict[str, dict[str, bool]] = {}  # round 0's answers, per set
    entries = []
    for folder in folders:
        row = json.loads((folder / "round.json").read_text())
        r = row["round"]
        how = seed_selection(loop_dir, r) or {}
        heldout = {}
        for name in row["heldout"]:
            located = _located(folder / "heldout" / name / "predictions.jsonl")
            if r == 0:
                base[name] = located
            items = sorted(set(base.get(name, {})) & set(located))
            heldout[name] = {
                "n": len(located),
                "correct": sum(located.values()),
                "mcnemar_p_vs_round0": None
                if r == 0 or not items
                else mcnemar_p([base[name][i] for i in items], [located[i] for i in items]),
            }
        entries.append(
            {
                "round": r,
                "difficulty": how.get("difficulty"),
                "levels_drawn": how.get("levels"),
                "heldout": heldout,
            }
        )
    return entries


def _located(path: Path) -> dict[str, bool]:
    return {p["source_id"]: bool(p["location_ok"]) for p in read_records(path)} if path.exists() else {}


def write_arms_report(run_dir: Path, arms: list[str]) -> Path:
    """RUN_DIR/arms.json, arms.md and arms.png; the report's path."""
    run_dir = Path(run_dir)
    comparison = compare_arms(run_dir, arms)
    write_json_atomic(run_dir / "arms.json", comparison)
    _plot(comparison["arms"], run_dir / "arms.png")
    lines = [
        f"# Arms: {run_dir.name}",
        "",
        "Location on the reported GSM8K set (the same items for every arm and round), each round against",
        "the shared round 0 with McNemar's exact test; the best round is chosen on the validation split.",
        "A round's stop-rule verdict (plateau, collapse) follows its number; an arm at a fixed budget goes on.",
        *_floors_line(comparison["arms"]),
        "",
        "| arm | round | location | p vs round 0 | recovery | judge / self-judge bal. acc. (verification set) "
        "| kept | labels taught (oracle-true) | top answer share | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rows in comparison["arms"].items():
        for row in rows:
            taught = row["taught"] or {}
            located = sum((taught.get("locations") or {}).values())
            verdict = f", {row['stop']}" if row["stop"] else ""  # the stop rule's, where it found one
            lines.append(
                f"| {arm} | {row['round']}{' (best)' if row['round'] == rows[-1]['best_round'] else ''}{verdict} "
                f"| {Rate(row['location_correct'], row['n'])} | {_p(row['mcnemar_p_vs_round0'])} "
                f"| {Rate(row['recovery_correct'], row['recovery_n'])} "
                f"| {_number(row['judge_balanced_accuracy'])} / {_number(row['self_judge_balanced_accuracy'])} "
                f"| {row['kept'] if row['kept'] is not None else '-'} "
                f"| {located} ({taught.get('locations_true', '-')}) | {_number(row['top_answer_share'])} "
                f"| {_number(sum(row['seconds'].values()) if row['seconds'] else None, '.0f')} |"
            )
    for key, title in (("pairs", "at their best rounds"), ("pairs_at_last", "at their last rounds")):
        lines += ["", f"## Arms against each other, {title}", ""]
        lines += ["| first arm (round): correct | second arm (round): correct | n | McNemar p |", "|---|---|---|---|"]
        for pair in comparison[key].values():
            cells = [f"{arm} ({pair['rounds'][arm]}): {pair['location_correct'][arm]}" for arm in pair["rounds"]]
            lines.append(f"| {cells[0]} | {cells[1]} | {pair['n']} | {_p(pair['mcnemar_p'])} |")
    if comparison["at_best"]:
        lines += ["", "## Measured at round 0 and at each arm's best round only", ""]
        lines += [
            "| set | round 0 | " + " | ".join(comparison["arms"]) + " |",
            "|---|---|" + "---|" * len(comparison["arms"]),
        ]
        for name, row in comparison["at_best"].items():
            cells = [
                f"round {row[arm]['round']}: {Rate(row[arm]['location_correct'], row[arm]['n'])}"
                f" (p {_p(row[arm]['mcnemar_p_vs_round0'])})"
                for arm in comparison["arms"]
            ]
            base = str(Rate(row["round 0"]["location_correct"], row["round 0"]["n"]))
            lines.append(f"| {name} | {base} | " + " | ".join(cells) + " |")
    lines += ["", "![location by round](arms.png)", ""]
    path = run_dir / "arms.md"
    path.write_text("\n".join(lines))
    return path


def _floors_line(table: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One sentence of round 0's floors (every round is measured on the same items)."""
    rows = next(iter(table.values()), [])
    floors = rows[0]["floors"] if rows else {}
    if floors.get("majority") is None:
        return []
    return [
        f"Floors on the same {rows[0]['n']} items: the majority label {floors['majority']}, "
        f"always the last step {floors['last_step']}."
    ]


def _plot(table: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rows in table.items():
        ax.plot(
            [r["round"] for r in rows], [r["location_correct"] / max(r["n"], 1) for r in rows], marker="o", label=arm
        )
    ax.set_xlabel("round")
    ax.set_ylabel("location accuracy (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _number(value: float | None, form: str = ".3f") -> str:
    return "-" if value is None else format(value, form)
