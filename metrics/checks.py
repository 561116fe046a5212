"""Ground-truth checks of a scenario the cycle wrote, by the oracle (GSM8K-style arithmetic chains)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from misstep.data.records import STAGES, Scenario
from misstep.metrics.oracle import answers_match, first_error
from misstep.metrics.stats import agreement, rate
from misstep.programs.self_corrector import SelfCorrector


def location_correct(predicted: int | None, gold: int | None) -> bool:
    """BIG-Bench Mistake's protocol: the exact first-error step, or correctly "no mistake"."""
    return predicted == gold


def departure(valid: Sequence[str], written: Sequence[str]) -> int | None:
    """The first step (0-based) at which a written chain departs from the valid chain it was written
    from, comparing text with runs of whitespace as one space (a chain longer or shorter departs
    where the other ends); None where it never does: the writer copied the chain instead of
    writing its mistake. A label no model has to produce."""
    for index in range(max(len(valid), len(written))):
        theirs = " ".join(valid[index].split()) if index < len(valid) else None
        mine = " ".join(written[index].split()) if index < len(written) else None
        if mine != theirs:
            return index
    return None


def check_scenario(scenario: Scenario) -> dict[str, Any]:
    """What really happened in a scenario, decided by the oracle rather than by any model."""
    chain = scenario.chain
    checks: dict[str, Any] = {}
    if not scenario.invalid_steps:
        return checks
    stated = scenario.output("describe", "mistake_step")
    checks["departure"] = departure(chain.steps, scenario.invalid_steps)
    checks["writer_failed"] = checks["departure"] is None  # no mistake written: nothing to train as one
    true_first = first_error(scenario.invalid_steps, reference=chain.steps)
    checks["invalid_first_error"] = true_first
    checks["injection_ok"] = true_first is not None and stated is not None and true_first == stated - 1
    located = scenario.stages.get("locate")
    if located is not None and located.ok:
        predicted = SelfCorrector.to_index(located.outputs, len(scenario.invalid_steps))
        checks["located"] = predicted
        checks["location_ok"] = location_correct(predicted, true_first)
    final_answer = scenario.output("recover", "final_answer")
    if final_answer is not None:
        checks["recovery_ok"] = answers_match(str(final_answer), chain.reference_answer)
        checks["recovered_first_error"] = first_error(scenario.recovered_steps)
    verdict = scenario.output("judge", "recovery_succeeded")
    if verdict is not None and "recovery_ok" in checks:
        checks["judge_verdict"] = bool(verdict)
        checks["judge_agrees"] = bool(verdict) == checks["recovery_ok"]
    return checks


def summarize_scenarios(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What a generate run produced: per stage how many parsed, failed or were skipped, and the
    oracle's view of the scenarios (injection, location, recovery, judge agreement)."""
    stages = {}
    for stage in STAGES:
        results = [r["stages"].get(stage) for r in records]
        stages[stage] = {
            "parsed": sum(1 for s in results if s and s["ok"]),
            "unparsable": sum(1 for s in results if s and not s["ok"] and s["error"] == "unparsable output"),
            "skipped": sum(1 for s in results if s is None or (s["error"] or "").startswith("skipped")),
        }
        stages[stage]["other_errors"] = len(results) - sum(stages[stage].values())
    checked = [r["oracle"] for r in records if r["oracle"]]
    judged = [c for c in checked if "judge_agrees" in c]
    return {
        "scenarios": len(records),
        "stages": stages,
        "injection_ok": rate(c["injection_ok"] for c in checked),
        "writer_departed": rate(not c["writer_failed"] for c in checked if "writer_failed" in c),
        "location_ok": rate(c["location_ok"] for c in checked if "location_ok" in c),
        "recovery_ok": rate(c["recovery_ok"] for c in checked if "recovery_ok" in c),
        "judge": agreement([c["judge_verdict"] for c in judged], [c["recovery_ok"] for c in judged]),
    }
