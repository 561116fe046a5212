"""The six stage signatures of the self-correction cycle.

Chains are shown to the model as numbered lines ("Step 1: ..."), counted from 1;
the programs convert step numbers to the 0-based indices the records keep.
Stage 1 (`DescribeMistake`) is the base of the error types in `error_types.py`.
"""

from typing import Annotated

import dspy

from misstep.signatures.fields import UNIT, StepNumber


class DescribeMistake(dspy.Signature):
    """Read a correct step-by-step solution and describe one plausible mistake a solver could make in it."""

    question: str = dspy.InputField()
    valid_chain: str = dspy.InputField(desc="the correct solution, one numbered step per line")
    mistake_step: Annotated[int, StepNumber("valid_chain")] = dspy.OutputField(
        desc="the number of the step where the mistake is made"
    )
    mistake_description: str = dspy.OutputField(desc="one sentence: what goes wrong in that step")


class WriteMistakenChain(dspy.Signature):
    """Rewrite a correct solution so that it makes the described mistake at the given step.

    Keep every step before that one unchanged; from that step on, carry the mistake
    forward as a solver who did not notice it would, down to a final answer."""

    question: str = dspy.InputField()
    valid_chain: str = dspy.InputField(desc="the correct solution, one numbered step per line")
    mistake_step: int = dspy.InputField(desc="the number of the step where the mistake is made")
    mistake_description: str = dspy.InputField()
    invalid_chain: str = dspy.OutputField(desc="the whole mistaken solution, one numbered step per line")
    invalid_answer: str = dspy.OutputField(desc="the final answer the mistaken solution reaches")


class LocateFirstError(dspy.Signature):
    """Check a step-by-step solution and find the first step that contains a mistake, if any."""

    question: str = dspy.InputField()
    chain: str = dspy.InputField(desc="a solution, one numbered step per line")
    has_mistake: bool = dspy.OutputField(desc="True if any step is wrong, False if every step is correct")
    first_error_step: Annotated[int, StepNumber("chain", none=0)] = dspy.OutputField(
        desc="the number of the first wrong step; 0 when there is no mistake"
    )


class RecoverFromError(dspy.Signature):
    """A solution goes wrong at the given step. Redo the solution from that step on, correctly."""

    question: str = dspy.InputField()
    chain: str = dspy.InputField(desc="the mistaken solution, one numbered step per line")
    first_error_step: int = dspy.InputField(desc="the number of the first wrong step")
    recovered_steps: str = dspy.OutputField(desc="correct steps replacing that step and all after it, one per line")
    final_answer: str = dspy.OutputField(desc="the final answer of the corrected solution")


class JudgeRecovery(dspy.Signature):
    """Judge whether a recovery fixed a mistaken solution: compare it with the correct solution."""

    question: str = dspy.InputField()
    invalid_chain: str = dspy.InputField(desc="the mistaken solution")
    recovery: str = dspy.InputField(desc="the recovered steps and final answer")
    correct_chain: str = dspy.InputField(desc="a correct solution with the right final answer")
    recovery_succeeded: bool = dspy.OutputField(desc="True if the recovery reaches the right answer by valid steps")
    confidence: Annotated[float, UNIT] = dspy.OutputField(desc="how sure you are, from 0.0 to 1.0")


class CurateScenario(dspy.Signature):
    """Decide whether this error-recovery scenario is a good training example.

    A good one has a realistic mistake, a mistaken solution that really makes it at
    the stated step, a correctly located first error and a recovery that succeeds."""

    question: str = dspy.InputField()
    correct_chain: str = dspy.InputField()
    mistake_description: str = dspy.InputField()
    invalid_chain: str = dspy.InputField()
    first_error_step: int = dspy.InputField(desc="where the first error was located")
    recovery: str = dspy.InputField()
    recovery_succeeded: bool = dspy.InputField(desc="the judge's verdict")
    keep: bool = dspy.OutputField(desc="True to keep this scenario for training")
    quality: Annotated[float, UNIT] = dspy.OutputField(desc="how good a training example it is, from 0.0 to 1.0")
    reason: str = dspy.OutputField(desc="one sentence: why")
