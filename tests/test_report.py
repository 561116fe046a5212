"""The report from constructed run files: a Wilson bound a rounding error inside its value (k = n)
must still plot (the 3-round SmolLM2 run's judge recall was 19/19 with high 0.9999999999999999)."""

import json

from misstep.optimize.report import write_report


def _rate(k, n, low, high):
    return {"k": k, "n": n, "value": k / n, "low": low, "high": high}


def test_a_perfect_rate_whose_upper_bound_rounds_below_it_still_plots(tmp_path):
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
            "judge": {"precision": _rate(19, 24, 0.6, 0.9), "recall": _rate(19, 19, 0.83, 0.9999999999999999)},
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
        (tmp_path / f"round-{row['round']}").mkdir()
        (tmp_path / f"round-{row['round']}" / "round.json").write_text(json.dumps(row))
    report = write_report(tmp_path).read_text()
    assert "1.000 [0.830, 1.000] (19/19)" in report
    assert (tmp_path / "judge.png").stat().st_size > 1000
    assert "| 1 | 60 | 600 | 660 |" in report  # the wall-time table
