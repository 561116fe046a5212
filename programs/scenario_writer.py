"""Stages 1 -> 2: describe a mistake that could be made in a valid chain, then write the chain that makes it."""

from __future__ import annotations

import dspy

from misstep.data.records import format_steps, parse_steps
from misstep.programs.stage import run_stage, stage_predictor
from misstep.signatures import DescribeMistake, WriteMistakenChain, error_type_name, get_error_type


class ScenarioWriter(dspy.Module):
    """Writes an invalid chain from a valid one, for one error type (a stage-1 signature)."""

    def __init__(self, error_type: str | type[DescribeMistake] = "arithmetic_slip"):
        super().__init__()
        signature = get_error_type(error_type)
        self.error_type = error_type_name(signature)
        self.describe = stage_predictor(signature, "describe")
        self.corrupt = stage_predictor(WriteMistakenChain, "corrupt")

    def forward(self, question: str, steps: tuple[str, ...] | list[str]) -> dspy.Prediction:
        valid_chain = format_steps(steps)
        described = run_stage(self.describe, question=question, valid_chain=valid_chain)
        if not described.ok:
            return dspy.Prediction(describe=described, corrupt=None, invalid_steps=())
        corrupted = run_stage(
            self.corrupt,
            question=question,
            valid_chain=valid_chain,
            mistake_step=described.outputs["mistake_step"],
            mistake_description=described.outputs["mistake_description"],
        )
        invalid_steps = parse_steps(corrupted.outputs["invalid_chain"]) if corrupted.ok else ()
        return dspy.Prediction(describe=described, corrupt=corrupted, invalid_steps=invalid_steps)
