"""Running one stage: a model output that cannot be parsed becomes a recorded failure, never a crash."""

from __future__ import annotations

import dspy
from dspy.utils.exceptions import AdapterParseError

from misstep.data.records import StageResult


def run_stage(predictor: dspy.Predict, **inputs) -> StageResult:
    """Call `predictor`; on a parse failure keep the raw text the model wrote."""
    try:
        prediction = predictor(**inputs)
    except AdapterParseError as exc:
        return StageResult(ok=False, raw=exc.lm_response, error="unparsable output")
    except Exception as exc:  # an LM error (context too long, engine failure) fails the stage, not the run
        return StageResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return StageResult(ok=True, outputs=dict(prediction.items()))
