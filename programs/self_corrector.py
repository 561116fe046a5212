"""Stages 3 -> 4: find the first error in a chain, then recover from it. The program compiled into weights."""

from __future__ import annotations

import dspy

from misstep.data.records import format_steps, parse_steps
from misstep.programs.stage import run_stage, stage_predictor
from misstep.signatures import LocateFirstError, RecoverFromError


class SelfCorrector(dspy.Module):
    """Locates the first error of a chain and rewrites the chain from there.

    `first_error` in the prediction is a 0-based step index, None for "no mistake",
    or -1 when the model named a step the chain does not have. Give `error_index`
    to skip locating and recover from a known location (as BIG-Bench Mistake's
    backtracking protocol does).
    """

    def __init__(self):
        super().__init__()
        self.locate = stage_predictor(LocateFirstError, "locate")
        self.recover = stage_predictor(RecoverFromError, "recover")

    def forward(self, question: str, steps: tuple[str, ...] | list[str], error_index: int | None = None) -> dspy.Prediction:
        steps = tuple(steps)
        chain = format_steps(steps)
        located = None
        if error_index is None:
            located = run_stage(self.locate, question=question, chain=chain)
            if not located.ok:
                return dspy.Prediction(locate=located, recover=None, first_error=None, recovered_steps=(), final_answer=None)
            error_index = self.to_index(located.outputs, len(steps))
            if error_index is None or error_index < 0:
                return dspy.Prediction(locate=located, recover=None, first_error=error_index, recovered_steps=(), final_answer=None)
        recovered = run_stage(self.recover, question=question, chain=chain, first_error_step=error_index + 1)
        recovered_steps = steps[:error_index] + parse_steps(recovered.outputs["recovered_steps"]) if recovered.ok else ()
        return dspy.Prediction(locate=located, recover=recovered, first_error=error_index, recovered_steps=recovered_steps,
                               final_answer=str(recovered.outputs["final_answer"]) if recovered.ok else None)

    @staticmethod
    def to_index(outputs: dict, n_steps: int) -> int | None:
        """The model's 1-based step number as a 0-based index (None: no mistake; -1: no such step)."""
        if not outputs["has_mistake"]:
            return None
        step = outputs["first_error_step"]
        return step - 1 if 1 <= step <= n_steps else -1
