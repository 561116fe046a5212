"""What an output field's type alone does not say, declared beside it with `typing.Annotated`.

Constrained decoding (programs/answer_format.py) reads these to bound a field's answer; the prompt and
the parsing do not change (DSPy shows and parses the bare type):

    first_error_step: Annotated[int, StepNumber("chain", none=0)] = dspy.OutputField()
    confidence: Annotated[float, Interval(ge=0, le=1)] = dspy.OutputField()

`Interval` is annotated_types' (pydantic's own constraint vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

from annotated_types import Interval

__all__ = ["Interval", "StepNumber", "UNIT"]


@dataclass(frozen=True)
class StepNumber:
    """An int naming a step of the chain in input field `of` (counted from 1), or `none` when given:
    the value that means "no step"."""

    of: str
    none: int | None = None


UNIT = Interval(ge=0, le=1)  # a probability-like score: from 0.0 to 1.0
