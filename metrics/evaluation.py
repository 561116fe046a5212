"""Held-out evaluation of the self-corrector against labels no model wrote.

Location: the model reads a chain and names its first wrong step, or "no mistake"
(BIG-Bench Mistake's protocol: only the exact step counts). Recovery: the model is
told the labelled first-error step and rewrites the chain from there (the paper's
backtracking setting); success is reaching the correct final answer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from misstep.data.loaders import NO_CHECKABLE_STEP, ORACLE_FINDS_WRONG, LoadReport, line_of
from misstep.data.records import Chain
from misstep.metrics.checks import location_correct
from misstep.metrics.injector import inject_many, types_in_turn, unreadable_steps
from misstep.metrics.oracle import answers_match, first_error
from misstep.metrics.stats import answer_spread, majority_baseline, rate
from misstep.programs.self_corrector import SelfCorrector


def injected_gsm8k(
    chains: list[Chain], limit: int | None, seed: int = 0, report: LoadReport | None = None
) -> list[Chain]:
    """`limit` (None: all) oracle-labelled invalid chains from valid GSM8K chains, error types in
    turn. `report` learns which solutions could not be labelled and why: the oracle finds a mistake
    in the solution itself, or no step holds arithmetic the injector can read."""
    labelled = []
    valid = 0
    for chain in chains:
        if first_error(chain.steps) is not None:  # a few GSM8K solutions have slips of their own
            _skip(report, ORACLE_FINDS_WRONG, chain)
            continue
        # Error types in turn across the valid solutions, as inject_many gives them over a list.
        injected = inject_many([chain], types_in_turn(valid), seed=seed)
        valid += 1
        if not injected:
            _skip(report, NO_CHECKABLE_STEP, chain)
            continue
        labelled.append(injected[0][1])
    if report is not None:
        report.loaded = len(labelled)
        originals = {c.source_id: c for c in chains}
        report.unreadable_steps = sum(unreadable_steps(originals[c.source_id]) for c in labelled)
    return labelled[:limit] if limit else labelled


def _skip(report: LoadReport | None, reason: str, chain: Chain) -> None:
    if report is not None:
        report.skip(reason, line_of(chain))


def evaluate_chain(corrector: SelfCorrector, chain: Chain, recover: bool = True) -> dict[str, Any]:
    """Locate the first error of one labelled chain and, where it has one, recover from it."""
    located, predicted = corrector.find_error(chain.question, chain.steps)
    record: dict[str, Any] = {
        "source_id": chain.source_id,
        "task": chain.task,
        "gold": chain.mistake_index,
        "steps": len(chain.steps),
        "parsed": located.ok,
        "predicted": predicted,
        "location_ok": located.ok and location_correct(predicted, chain.mistake_index),
        "locate_raw": located.raw,
    }
    if recover and chain.mistake_index is not None:
        recovered = corrector.recover_from(chain.question, chain.steps, chain.mistake_index)
        record["recover_parsed"] = recovered["recover"].ok
        record["final_answer"] = recovered["final_answer"]
        record["recovery_ok"] = answers_match(recovered["final_answer"], chain.reference_answer)
    return record


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task (and 'all'): location accuracy, parse rate, recovery success, each with a 95% interval,
    beside the two floors a model must beat (always the majority label, always the last step), and
    the spread of the model's stage-3 answers (one answer to everything is a collapse)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    if len(by_task) > 1:
        by_task["all"] = list(records)
    summary = {}
    for task, rows in sorted(by_task.items()):
        with_mistake = [r for r in rows if r["gold"] is not None and "recovery_ok" in r]
        summary[task] = {
            "n": len(rows),
            "location_accuracy": rate(r["location_ok"] for r in rows),
            "majority_baseline": majority_baseline([r["gold"] for r in rows]),
            "last_step_baseline": rate(r["gold"] is not None and r["gold"] == (r.get("steps") or 0) - 1 for r in rows),
            "answers": answer_spread(
                [r["predicted"] if r["parsed"] else "unparsed" for r in rows], [(r.get("steps") or 0) - 1 for r in rows]
            ),
            "locate_parsed": rate(r["parsed"] for r in rows),
            "recovery_success": rate(r["recovery_ok"] for r in with_mistake),
            "recover_parsed": rate(r["recover_parsed"] for r in with_mistake),
        }
    return summary
