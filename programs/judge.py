"""Stages 5 -> 6: judge whether a recovery succeeded, then decide whether the scenario is worth training on."""

from __future__ import annotations

import dspy

from misstep.data.records import format_steps
from misstep.programs.stage import run_stage, stage_predictor
from misstep.signatures import CurateScenario, JudgeRecovery


class Judge(dspy.Module):
    """The judge (stage 5) and the curator (stage 6): later, the metric of the compile."""

    def __init__(self):
        super().__init__()
        self.judge = stage_predictor(JudgeRecovery, "judge")
        self.curate = stage_predictor(CurateScenario, "curate")

    def forward(
        self,
        question: str,
        valid_steps,
        invalid_steps,
        recovered_steps,
        final_answer: str | None,
        first_error: int | None,
        mistake_description: str = "",
    ) -> dspy.Prediction:
        recovery = format_steps(recovered_steps) + f"\nFinal answer: {final_answer}"
        judged = run_stage(
            self.judge,
            question=question,
            invalid_chain=format_steps(invalid_steps),
            recovery=recovery,
            correct_chain=format_steps(valid_steps),
        )
        if not judged.ok:
            return dspy.Prediction(judge=judged, curate=None)
        curated = run_stage(
            self.curate,
            question=question,
            correct_chain=format_steps(valid_steps),
            mistake_description=mistake_description,
            invalid_chain=format_steps(invalid_steps),
            first_error_step=(first_error + 1) if first_error is not None and first_error >= 0 else 0,
            recovery=recovery,
            recovery_succeeded=judged.outputs["recovery_succeeded"],
        )
        return dspy.Prediction(judge=judged, curate=curated)
