"""Ground-truth checks of a scenario the cycle wrote, by the oracle (GSM8K-style arithmetic chains)."""

from __future__ import annotations

from typing import Any

from misstep.data.records import Scenario
from misstep.metrics.oracle import answers_match, first_error
from misstep.programs.self_corrector import SelfCorrector


def location_correct(predicted: int | None, gold: int | None) -> bool:
    """BIG-Bench Mistake's protocol: the exact first-error step, or correctly "no mistake"."""
    return predicted == gold


def check_scenario(scenario: Scenario) -> dict[str, Any]:
    """What really happened in a scenario, decided by the oracle rather than by any model."""
    chain = scenario.chain
    checks: dict[str, Any] = {}
    if not scenario.invalid_steps:
        return checks
    stated = scenario.output("describe", "mistake_step")
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
        checks["judge_agrees"] = bool(verdict) == checks["recovery_ok"]
    return checks
