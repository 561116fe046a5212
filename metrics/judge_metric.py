"""The judge (stages 5-6) as the DSPy metric of a compile: keep a self-corrector trace or not.

The thresholds are explicit parameters (Optuna tunes them across rounds). The judge
runs on its own LM, by default the frozen base model, so compiling the student never
trains the judge by accident. Where ground truth exists, every decision is recorded
beside it, so a compile reports how often the judge agreed with the oracle.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import dspy

from misstep.metrics.oracle import answers_match
from misstep.metrics.stats import agreement
from misstep.programs import Judge
from misstep.programs.answer_format import AnswerAdapter


@dataclass(frozen=True)
class Thresholds:
    """What a trace needs to be kept: a succeeded verdict at least this sure, and a kept
    curation at least this good."""

    min_confidence: float = 0.5
    min_quality: float = 0.5

    def admit(self, decision: dict[str, Any]) -> bool:
        """Keep a judged trace? `decision` holds the judge's verdict and confidence and the
        curator's keep and quality (missing where that stage's answer did not parse)."""
        if not decision.get("verdict") or not decision.get("keep"):
            return False
        return decision["confidence"] >= self.min_confidence and decision["quality"] >= self.min_quality


def verdicts(judge_outputs: dict[str, Any] | None, curate_outputs: dict[str, Any] | None) -> dict[str, Any]:
    """The judge's verdict and confidence and the curator's keep, quality and reason, typed,
    from the stages' parsed outputs (None where a stage's answer did not parse): what
    `Thresholds.admit` reads, for a metric's trace and for a scenario record alike."""
    if judge_outputs is None:
        return {}
    out: dict[str, Any] = {
        "verdict": bool(judge_outputs["recovery_succeeded"]),
        "confidence": float(judge_outputs["confidence"]),
    }
    if curate_outputs is not None:
        out.update(
            keep=bool(curate_outputs["keep"]),
            quality=float(curate_outputs["quality"]),
            reason=str(curate_outputs.get("reason", "")),
        )
    return out


class JudgeMetric:
    """`metric(example, prediction, trace=None) -> bool` for `BootstrapFinetune`.

    `example` carries the invalid chain (`question`, `steps`) as inputs and, as labels,
    `valid_steps`, `reference_answer` and `mistake_index`; `prediction` is what
    `SelfCorrector` returned.
    """

    def __init__(
        self,
        judge_lm: dspy.LM,
        thresholds: Thresholds = Thresholds(),
        judge: Judge | None = None,
        constrained: bool = True,
    ):
        self.judge_lm = judge_lm
        self.adapter = AnswerAdapter(constrained)
        self.thresholds = thresholds
        self.judge = judge or Judge()
        self.decisions: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, example: dspy.Example, prediction: dspy.Prediction, trace=None) -> bool:
        decision: dict[str, Any] = {"source_id": example.get("source_id"), "kept": False}
        if prediction.get("final_answer") is None:
            decision["reason"] = "no recovery to judge"
        else:
            with dspy.context(lm=self.judge_lm, adapter=self.adapter):
                judged = self.judge(
                    question=example.question,
                    valid_steps=example.valid_steps,
                    invalid_steps=example.steps,
                    recovered_steps=prediction.recovered_steps,
                    final_answer=prediction.final_answer,
                    first_error=prediction.first_error,
                )
            decision.update(self._decide(judged))
        if example.get("reference_answer") is not None:  # ground truth no model wrote
            decision["oracle_location_ok"] = prediction.get("first_error") == example.get("mistake_index")
            decision["oracle_recovery_ok"] = answers_match(prediction.get("final_answer"), example.reference_answer)
        with self._lock:
            self.decisions.append(decision)
        return decision["kept"]

    def _decide(self, judged: dspy.Prediction) -> dict[str, Any]:
        if not judged.judge.ok:
            return {"reason": "judge answer unparsable"}
        curated = judged.curate.outputs if judged.curate is not None and judged.curate.ok else None
        out = verdicts(judged.judge.outputs, curated)
        if curated is None:
            return {**out, "reason": "curator answer unparsable"}
        return {**out, "kept": self.thresholds.admit(out)}

    def report(self) -> dict[str, Any]:
        """How many traces were kept, and the judge's agreement with the oracle's recovery verdict."""
        checked = [d for d in self.decisions if "oracle_recovery_ok" in d]
        return {
            "metric": "judge",
            "thresholds": asdict(self.thresholds),
            "judged": len(self.decisions),
            "kept": sum(d["kept"] for d in self.decisions),
            "oracle_agreement": {
                k: v.to_dict()
                for k, v in agreement([d["kept"] for d in checked], [d["oracle_recovery_ok"] for d in checked]).items()
            },
        }


class OracleMetric:
    """Keep a trace when ground truth confirms it: the first error found at the labelled step
    and (with `require_recovery`) a recovery that reaches the reference answer.

    No model's opinion is involved, so a compile with this metric is the upper bound that a
    judge-metric compile can be compared with, and the way to train on the location stage
    alone while recoveries do not yet parse (`require_recovery=False`).
    """

    def __init__(self, require_recovery: bool = True):
        self.require_recovery = require_recovery
        self.decisions: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, example: dspy.Example, prediction: dspy.Prediction, trace=None) -> bool:
        location_ok = (
            prediction.get("first_error") is not None and prediction.get("first_error") == example.mistake_index
        )
        recovery_ok = answers_match(prediction.get("final_answer"), example.reference_answer)
        kept = location_ok and (recovery_ok or not self.require_recovery)
        with self._lock:
            self.decisions.append(
                {
                    "source_id": example.get("source_id"),
                    "kept": kept,
                    "oracle_location_ok": location_ok,
                    "oracle_recovery_ok": recovery_ok,
                }
            )
        return kept

    def report(self) -> dict[str, Any]:
        return {
            "metric": "oracle",
            "require_recovery": self.require_recovery,
            "judged": len(self.decisions),
            "kept": sum(d["kept"] for d in self.decisions),
        }
