"""The judge's ground truth, with real failures among its negatives.

A judge trained only on the valid chain (a success) and the corrupted chain copied word for word
(a failure) learns to tell a copy from the answer key, not a failed recovery from a good one, and
it says 0.9 to everything. Here each injected chain gives one success and one failure, and the
failure is, in order of preference:

- **written**: a recovery the base model itself wrote for that chain and the oracle rejects (its
  final answer is wrong): the kind of failure the judge will meet;
- **partial**: the first wrong step corrected, the steps after it still the mistaken chain's, and
  its wrong answer;
- **copy**: the mistaken chain itself.

Written failures are preferred, but a quarter of the failures (the last pairs that have a written
one) are made instead, so that the judge also meets the near misses a partial fix shows and its
confidence has three levels even where the model fails every recovery; written ones stay at
least half.

Confidence has a level per kind, from how plain the verdict is: a copy 0.95, a success 0.9, a
written failure 0.8, a partial fix 0.65.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import dspy

from misstep.data.records import Chain, format_steps
from misstep.metrics.injector import inject_many
from misstep.metrics.oracle import answers_match
from misstep.optimize.demos import ALIGNED_TYPES, checkable, recovery_text
from misstep.programs import SelfCorrector
from misstep.programs.answer_format import AnswerAdapter
from misstep.programs.parallel import map_logged

CONFIDENCE = {"success": 0.9, "copy": 0.95, "written": 0.8, "partial": 0.65}


def injected_pairs(chains: list[Chain], k: int, seed: int = 0) -> list[tuple[Chain, Chain]]:
    """Up to `k` (valid, mistaken) pairs, step-aligned error types in turn."""
    return [(valid, bad) for valid, bad, _ in inject_many(checkable(chains), error_types=ALIGNED_TYPES, seed=seed)][:k]


def checked_recovery(
    corrector: SelfCorrector, question: str, steps: tuple[str, ...], first_error: int, reference_answer: str
) -> dict[str, Any]:
    """`corrector`'s recovery (stage 4, told where the first error is) with the oracle's verdict:
    whether it parsed, its steps and final answer, and whether that answer is the reference's."""
    out = corrector.recover_from(question, steps, first_error)
    answer = out["final_answer"]
    return {
        "parsed": out["recover"].ok,
        "recovered_steps": list(out["recovered_steps"]),
        "final_answer": answer,
        "recovery_ok": answer is not None and answers_match(answer, reference_answer),
    }


def written_failures(
    pairs: list[tuple[Chain, Chain]],
    lm: dspy.LM,
    demos: dict[str, list[dspy.Example]],
    path: Path,
    *,
    num_threads: int = 8,
    constrained: bool = True,
) -> dict[str, str]:
    """The recoveries `lm` writes for each mistaken chain, told where its first error is (stage 4
    with `demos`), kept in `path` (JSONL, resumable); those the oracle rejects, as the judge is
    shown them, by the mistaken chain's source id."""
    corrector = SelfCorrector()
    corrector.recover.demos = list(demos.get("recover", []))

    def recover(pair: tuple[Chain, Chain]) -> dict[str, Any]:
        valid, bad = pair
        checked = checked_recovery(corrector, bad.question, bad.steps, bad.mistake_index, valid.answer)
        shown = recovery_text(checked["recovered_steps"], checked["final_answer"]) if checked["parsed"] else None
        return {"source_id": bad.source_id, "recovery": shown, **checked}

    records = map_logged(
        recover,
        pairs,
        path,
        lambda pair: pair[1].source_id,
        key="source_id",
        lm=lm,
        adapter=AnswerAdapter(constrained),
        num_threads=num_threads,
        description="the judge's ground truth: recoveries to reject",
    )
    return {r["source_id"]: r["recovery"] for r in records if r["parsed"] and not r["recovery_ok"]}


def judge_examples(pairs: list[tuple[Chain, Chain]], failures: dict[str, str]) -> list[dspy.Example]:
    """A success and a failure per pair (the failure written where `failures` has one, except for a
    quarter of the pairs; else a partial fix where the chain allows one, else the copy), successes and
    failures in turn."""
    with_written = [bad.source_id for _, bad in pairs if bad.source_id in failures]
    made = max(0, len(pairs) // 4 - (len(pairs) - len(with_written)))  # written failures to set aside
    written = set(with_written[: len(with_written) - made])
    examples = []
    for valid, bad in pairs:
        step = bad.mistake_index
        shown = dict(
            question=valid.question, invalid_chain=format_steps(bad.steps), correct_chain=format_steps(valid.steps)
        )
        if bad.source_id in written:
            kind, recovery = "written", failures[bad.source_id]
        elif step + 1 < len(bad.steps):
            partial = (*valid.steps[: step + 1], *bad.steps[step + 1 :])
            kind, recovery = "partial", recovery_text(partial, bad.answer)
        else:
            kind, recovery = "copy", recovery_text(bad.steps, bad.answer)
        examples.append(
            dspy.Example(
                **shown,
                recovery=recovery_text(valid.steps, valid.answer),
                recovery_succeeded=True,
                confidence=CONFIDENCE["success"],
                kind="success",
            )
        )
        examples.append(
            dspy.Example(**shown, recovery=recovery, recovery_succeeded=False, confidence=CONFIDENCE[kind], kind=kind)
        )
    return examples


def composition(examples: list[dspy.Example]) -> dict[str, Any]:
    """What the judge's ground truth holds: examples by kind, and the confidence levels."""
    return {
        "by_kind": dict(Counter(e.kind for e in examples)),
        "confidence_levels": sorted({e.confidence for e in examples}),
    }
