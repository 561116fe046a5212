"""Stages 3 -> 4: find the first error in a chain, then recover from it. The program compiled into weights."""

from __future__ import annotations

import dspy

from misstep.data.records import StageResult, format_steps, parse_steps
from misstep.programs.stage import run_stage, stage_predictor
from misstep.signatures import LocateFirstError, RecoverFromError


class SelfCorrector(dspy.Module):
    """Locates the first error of a chain and rewrites the chain from there.

    `first_error` in the prediction is a 0-based step index, None for "no mistake",
    or -1 when the model named a step the chain does not have. Give `error_index`
    to skip locating and recover from a known location (as BIG-Bench Mistake's
    backtracking protocol does); `locate` and `recover` run one stage each.
    """

    def __init__(self):
        super().__init__()
        self.locate = stage_predictor(LocateFirstError, "locate")
        self.recover = stage_predictor(RecoverFromError, "recover")

    def forward(
        self, question: str, steps: tuple[str, ...] | list[str], error_index: int | None = None
    ) -> dspy.Prediction:
        located = None
        if error_index is None:
            located, error_index = self.find_error(question, steps)
            if error_index is None or error_index < 0:
                return dspy.Prediction(
                    locate=located, recover=None, first_error=error_index, recovered_steps=(), final_answer=None
                )
        recovered = self.recover_from(question, steps, error_index)
        return dspy.Prediction(locate=located, first_error=error_index, **recovered)

    def find_error(self, question: str, steps) -> tuple[StageResult, int | None]:
        """Stage 3 alone: the stage result and the 0-based first-error index it names."""
        located = run_stage(self.locate, question=question, chain=format_steps(steps))
        return located, (self.to_index(located.outputs, len(steps)) if located.ok else None)

    def recover_from(self, question: str, steps, error_index: int) -> dict:
        """Stage 4 alone: rewrite `steps` from `error_index` on."""
        steps = tuple(steps)
        recovered = run_stage(
            self.recover, question=question, chain=format_steps(steps), first_error_step=error_index + 1
        )
        if not recovered.ok:
            return {"recover": recovered, "recovered_steps": (), "final_answer": None}
        return {
            "recover": recovered,
            "recovered_steps": steps[:error_index] + parse_steps(recovered.outputs["recovered_steps"]),
            "final_answer": str(recovered.outputs["final_answer"]),
        }

    @staticmethod
    def to_index(outputs: dict, n_steps: int) -> int | None:
        """The model's 1-based step number as a 0-based index (None: no mistake; -1: no such step)."""
        if not outputs["has_mistake"]:
            return None
        step = outputs["first_error_step"]
        return step - 1 if 1 <= step <= n_steps else -1
