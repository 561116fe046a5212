"""The report from constructed run files: a Wilson bound a rounding error inside its value (k = n)
must still plot (the 3-round SmolLM2 run's judge recall was 19/19 with high 0.9999999999999999)."""

import json

from misstep.optimize.report import write_report


def _rate(k, n, low, high):
    return {"k": k, "n": n, "value": k / n, "low": low, "high": high}


def _write_rounds(run_dir, judge_recall):
    """Round 0 and a round 1 with 24 scenarios, as round.json files."""
    heldout = {
        "gsm8k": {
            "gsm8k": {"n": 4, "location_accuracy": _rate(1, 4, 0.05, 0.7), "recovery_success": _rate(0, 4, 0.0, 0.49)}
        }
    }
    verdict = {"stop": False, "reason": "continue", "best_round": 0, "detail": "d"}
    rows = [
        {"round": 0, "model": "m0", "heldout": heldout, "verdict": verdict},
        {
            "round": 1,
            "model": "m1",
            "heldout": heldout,
            "verdict": verdict,
            "judge": {"precision": _rate(19, 24, 0.6, 0.9), "recall": judge_recall},
            "scenarios": 24,
            "kept": 23,
            "acceptance": _rate(23, 24, 0.8, 0.99),
            "kept_error_types": {},
            "diversity": {"distinct_2": 0.4, "near_duplicates": 0.0},
            "thresholds": None,
            "seconds": {"scenarios": 60.0, "compile": 600.0},
        },
    ]
    for row in rows:
        (run_dir / f"round-{row['round']}").mkdir()
        (run_dir / f"round-{row['round']}" / "round.json").write_text(json.dumps(row))


def test_a_perfect_rate_whose_upper_bound_rounds_below_it_still_plots(tmp_path):
    _write_rounds(tmp_path, judge_recall=_rate(19, 19, 0.83, 0.9999999999999999))
    report = write_report(tmp_path).read_text()
    assert "1.000 [0.830, 1.000] (19/19)" in report
    assert (tmp_path / "judge.png").stat().st_size > 1000
    assert "| 1 | 60 | 600 | 660 |" in report  # the wall-time table


def test_the_writers_chains_are_counted_by_error_type_once_a_chain(tmp_path):
    # Round 1 wrote three chains: a skipped step the oracle finds, and two wrong operations, one a
    # copy of its valid chain (no first error), one with the mistake a step early. The first was
    # judged three times (candidates 0-2 share its written chain): it counts once.
    _write_rounds(tmp_path, judge_recall=_rate(19, 19, 0.83, 0.99))
    written = [
        ("a", "skipped_step", {"invalid_first_error": 1, "injection_ok": True}),
        ("b", "wrong_operation", {"invalid_first_error": None, "injection_ok": False}),
        ("c", "wrong_operation", {"invalid_first_error": 0, "injection_ok": False}),
    ]
    records = [{"source_id": s, "error_type": t, "oracle": oracle} for s, t, oracle in written]
    records += [{**records[0], "candidate": candidate} for candidate in (1, 2)]
    (tmp_path / "round-1" / "scenarios.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    report = write_report(tmp_path).read_text()
    writer = report.split("### What the model wrote")[1].split("###")[0]
    assert "(2/3) | " in writer and "(1/3) | " in writer
    assert "| skipped_step 1/1, wrong_operation 1/2 |" in writer


def test_arms_compare_item_by_item_at_their_best_and_at_their_last_rounds(tmp_path):
    from misstep.optimize.arms_report import write_arms_report

    # Four held-out chains. Round 0 locates items 0 and 1; the "up" arm's round 1 locates all four
    # (its best), its round 2 none; the "flat" arm's round 1 answers as round 0 (best: round 0).
    answers = {
        "round-0": [1, 1, 0, 0],
        "arm-up/round-1": [1, 1, 1, 1],
        "arm-up/round-2": [0, 0, 0, 0],
        "arm-flat/round-1": [1, 1, 0, 0],
    }
    best = {"arm-up": 1, "arm-flat": 0}
    for folder, located in answers.items():
        arm = folder.split("/")[0]
        r = int(folder.rsplit("-", 1)[1])
        verdict = {"stop": False, "reason": "continue", "best_round": best.get(arm, 0), "detail": "d"}
        (tmp_path / folder / "heldout" / "gsm8k").mkdir(parents=True)
        (tmp_path / folder / "round.json").write_text(json.dumps({"round": r, "heldout": {}, "verdict": verdict}))
        (tmp_path / folder / "heldout" / "gsm8k" / "predictions.jsonl").write_text(
            "".join(json.dumps({"source_id": f"c{i}", "location_ok": bool(ok)}) + "\n" for i, ok in enumerate(located))
        )
    for arm in best:
        (tmp_path / arm / "loop.json").write_text(json.dumps({"start_dir": ".."}))

    report = write_arms_report(tmp_path, ["up", "flat"]).read_text()
    comparison = json.loads((tmp_path / "arms.json").read_text())
    at_best, at_last = comparison["pairs"]["up vs flat"], comparison["pairs_at_last"]["up vs flat"]
    assert at_best["rounds"] == {"up": 1, "flat": 0} and at_best["location_correct"] == {"up": 4, "flat": 2}
    assert at_last["rounds"] == {"up": 2, "flat": 1} and at_last["location_correct"] == {"up": 0, "flat": 2}
    assert at_best["n"] == at_last["n"] == 4 and at_best["mcnemar_p"] == at_last["mcnemar_p"] == 0.5
    assert [row["round"] for row in comparison["arms"]["up"]] == [0, 1, 2]
    assert "| up (1): 4 | flat (0): 2 | 4 | 0.5 |" in report and "| up (2): 0 | flat (1): 2 | 4 | 0.5 |" in report
