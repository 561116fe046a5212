"""Two runs' location predictions on the same items, paired: per task and overall, how many answers
parsed and were right in each, McNemar's exact p, and on the items that parsed in both, how many
answers agree and how many each got right (what the difference is made of).

    .venv/bin/python scripts/compare_evaluations.py runs/issue14/evaluate-gsm8k-constrained \
        runs/issue14/evaluate-gsm8k-no-constrained [--json out.json]

Each argument is a `misstep evaluate` run directory (or its predictions.jsonl), or a control run's
predictions (docs/results/control/<run>.jsonl); items are paired by task and source id (an evaluation's
`source_id`, a control's `item_id`), and an answer is right where its record says so (`location_ok`,
or the control's `correct`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from misstep.data.tables import DataFileError, read_jsonl
from misstep.metrics.stats import mcnemar_p, rate


def predictions(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    path = path / "predictions.jsonl" if path.is_dir() else path
    records = {}
    for number, record in read_jsonl(path):
        try:
            key = (record["task"], record["source_id"] if "source_id" in record else record["item_id"])
            right = record["location_ok"] if "location_ok" in record else record["correct"]
        except KeyError as exc:
            raise SystemExit(f"{path}:{number}: no {exc} field: not a predictions file") from None
        if key in records:
            raise SystemExit(f"{path}:{number}: {key} is there twice")
        records[key] = record | {"location_ok": right}
    return records


def paired(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, Any]:
    a = [bool(r["location_ok"]) for r in first]
    b = [bool(r["location_ok"]) for r in second]
    both = [(x, y) for x, y in zip(first, second) if x["parsed"] and y["parsed"]]
    return {
        "n": len(first),
        "first": {"parsed": rate(r["parsed"] for r in first).to_dict(), "correct": rate(a).to_dict()},
        "second": {"parsed": rate(r["parsed"] for r in second).to_dict(), "correct": rate(b).to_dict()},
        "mcnemar_p": mcnemar_p(a, b),
        "parsed_in_both": {
            "n": len(both),
            "same_answer": sum(x["predicted"] == y["predicted"] for x, y in both),
            "first_correct": sum(bool(x["location_ok"]) for x, _ in both),
            "second_correct": sum(bool(y["location_ok"]) for _, y in both),
        },
    }


def compare(first_path: Path, second_path: Path) -> dict[str, Any]:
    first, second = predictions(first_path), predictions(second_path)
    if first.keys() != second.keys():
        only = sorted(first.keys() ^ second.keys())[:5]
        raise SystemExit(f"the two runs are not on the same items ({len(first)} and {len(second)}; e.g. {only})")
    by_task: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in sorted(first):
        by_task[key[0]].append(key)
    keys = sorted(first)
    result = {"first": str(first_path), "second": str(second_path)}
    result["all"] = paired([first[k] for k in keys], [second[k] for k in keys])
    if len(by_task) > 1:
        result["by_task"] = {t: paired([first[k] for k in ks], [second[k] for k in ks]) for t, ks in by_task.items()}
    return result


def line(name: str, row: dict[str, Any]) -> str:
    f, s, both = row["first"], row["second"], row["parsed_in_both"]
    return (
        f"{name}: n {row['n']}; parsed {f['parsed']['k']} vs {s['parsed']['k']}; "
        f"correct {f['correct']['k']} vs {s['correct']['k']} (McNemar p = {row['mcnemar_p']:.2g}); "
        f"parsed in both {both['n']}: same answer {both['same_answer']}, correct {both['first_correct']} vs "
        f"{both['second_correct']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--json", type=Path, help="also write the comparison here")
    args = parser.parse_args()
    try:
        result = compare(args.first, args.second)
    except DataFileError as exc:
        raise SystemExit(str(exc)) from None
    print(line("all", result["all"]))
    for task, row in result.get("by_task", {}).items():
        print(line(task, row))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
