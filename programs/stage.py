"""Running one stage: a model output that cannot be parsed becomes a recorded failure, never a crash."""

from __future__ import annotations

import dspy
from dspy.utils.exceptions import AdapterParseError

from misstep.data.records import StageResult

# Answer-length budget of each stage, in tokens. A stage that answers one number needs
# few; a small model that loses the format would otherwise ramble on to the LM's limit.
STAGE_MAX_TOKENS = {"describe": 128, "corrupt": 384, "locate": 48, "recover": 320, "judge": 48, "curate": 128}


def stage_predictor(signature, stage: str) -> dspy.Predict:
    """The predictor of one stage, with that stage's answer budget."""
    return dspy.Predict(signature, max_tokens=STAGE_MAX_TOKENS[stage])


def run_stage(predictor: dspy.Predict, **inputs) -> StageResult:
    """Call `predictor`; on a parse failure keep the raw text the model wrote."""
    try:
        prediction = predictor(**inputs)
    except AdapterParseError as exc:
        return StageResult(ok=False, raw=exc.lm_response, error="unparsable output")
    except Exception as exc:  # an LM error (context too long, engine failure) fails the stage, not the run
        return StageResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return StageResult(ok=True, outputs=dict(prediction.items()))
