"""Few-shot demonstrations built from ground truth, so a small model learns each stage's format.

SmolLM2-135M, shown only the ChatAdapter instructions, answers with Python code; one
or two worked examples in the prompt make it answer in fields. The examples come from
the deterministic injector on training chains (never the held-out ones), so they are
exact and no model wrote them. Rounds of compiling replace them with the model's own
kept traces.
"""

from __future__ import annotations

import dspy

from misstep.data.records import Chain, format_steps
from misstep.metrics.injector import inject_many
from misstep.metrics.oracle import ANNOTATION, first_error
from misstep.programs.scenario_writer import ScenarioWriter

# Error types whose corrupted chain keeps the valid chain's step count, so that the valid
# steps from the error on are exactly the recovery (a skipped step would need one back).
ALIGNED_TYPES = ("arithmetic_slip", "wrong_operand", "wrong_operation", "misread_quantity")


def _describe(valid: Chain, invalid: Chain) -> str:
    step = invalid.mistake_index
    right, wrong = ANNOTATION.search(valid.steps[step]), ANNOTATION.search(invalid.steps[step])
    return (
        f"Step {step + 1} computes {wrong.group(1)} = {wrong.group(2)} "
        f"where the correct calculation is {right.group(1)} = {right.group(2)}."
    )


def recovery_text(steps, answer: str) -> str:
    return format_steps(steps) + f"\nFinal answer: {answer}"


def checkable(chains: list[Chain]) -> list[Chain]:
    return [c for c in chains if c.is_valid and first_error(c.steps) is None]


def _writer_examples(valid: Chain, invalid: Chain) -> tuple[dspy.Example, dspy.Example]:
    """Stage 1 and 2 worked examples: the injected mistake, described and written."""
    step, description = invalid.mistake_index, _describe(valid, invalid)
    valid_text = format_steps(valid.steps)
    described = dspy.Example(
        question=valid.question, valid_chain=valid_text, mistake_step=step + 1, mistake_description=description
    )
    written = dspy.Example(
        question=valid.question,
        valid_chain=valid_text,
        mistake_step=step + 1,
        mistake_description=description,
        invalid_chain=format_steps(invalid.steps),
        invalid_answer=invalid.answer,
    )
    return described, written


def ground_truth_demos(chains: list[Chain], k: int = 2, seed: int = 0) -> dict[str, list[dspy.Example]]:
    """Up to `k` demos for each of the six stages, by predictor name, from valid chains."""
    triples = inject_many(checkable(chains), error_types=ALIGNED_TYPES, seed=seed)[:k]
    demos: dict[str, list[dspy.Example]] = {
        name: [] for name in ("describe", "corrupt", "locate", "recover", "judge", "curate")
    }
    for n, (valid, invalid, _) in enumerate(triples):
        step = invalid.mistake_index
        valid_text, invalid_text = format_steps(valid.steps), format_steps(invalid.steps)
        # The judge is shown whole recovered chains, as the Judge program formats them.
        good = recovery_text(valid.steps, valid.answer)
        bad = recovery_text(invalid.steps, invalid.answer)
        described, written = _writer_examples(valid, invalid)
        description = described.mistake_description
        demos["describe"].append(described)
        demos["corrupt"].append(written)
        demos["locate"].append(
            dspy.Example(question=valid.question, chain=invalid_text, has_mistake=True, first_error_step=step + 1)
        )
        demos["recover"].append(
            dspy.Example(
                question=valid.question,
                chain=invalid_text,
                first_error_step=step + 1,
                recovered_steps="\n".join(valid.steps[step:]),
                final_answer=valid.answer,
            )
        )
        # The judge sees one recovery that works and one that repeats the mistake, in turn.
        succeeded = n % 2 == 0
        recovery = good if succeeded else bad
        demos["judge"].append(
            dspy.Example(
                question=valid.question,
                invalid_chain=invalid_text,
                recovery=recovery,
                correct_chain=valid_text,
                recovery_succeeded=succeeded,
                confidence=0.9,
            )
        )
        demos["curate"].append(
            dspy.Example(
                question=valid.question,
                correct_chain=valid_text,
                mistake_description=description,
                invalid_chain=invalid_text,
                first_error_step=step + 1,
                recovery=recovery,
                recovery_succeeded=succeeded,
                keep=succeeded,
                quality=0.9 if succeeded else 0.1,
                reason="The mistake is located and fixed." if succeeded else "The recovery repeats the mistake.",
            )
        )
    return demos


def writer_ground_truth(
    chains: list[Chain], error_types: list[str], k: int, seed: int = 0
) -> dict[str, dict[str, list[dspy.Example]]]:
    """Up to `k` stage-1 and stage-2 worked examples for each error type the injector makes
    exactly (by error type, then stage), from valid chains: what the scenario writer is trained
    on, so that the chains it writes carry a mistake the oracle can find. Error types the
    injector cannot make step-aligned (a skipped step, a user's own type) get none."""
    types = [t for t in error_types if t in ALIGNED_TYPES]
    out: dict[str, dict[str, list[dspy.Example]]] = {t: {"describe": [], "corrupt": []} for t in types}
    if not types:
        return out
    for valid, invalid, error_type in inject_many(checkable(chains), error_types=types, seed=seed):
        stages = out[error_type]
        if len(stages["describe"]) < k:
            described, written = _writer_examples(valid, invalid)
            stages["describe"].append(described)
            stages["corrupt"].append(written)
    return out


def writer_chat_data(
    truth: dict[str, dict[str, list[dspy.Example]]], adapter: dspy.ChatAdapter | None = None
) -> list[dict]:
    """`writer_ground_truth`'s examples as chat records, each under its own error type's signature."""
    return [
        record
        for error_type, examples in truth.items()
        for record in ground_truth_chat_data(ScenarioWriter(error_type), examples, adapter)
    ]


def attach_demos(program: dspy.Module, demos: dict[str, list[dspy.Example]]) -> dspy.Module:
    """Give every stage predictor of `program` its demos (matched by predictor name)."""
    for name, predictor in program.named_predictors():
        stage = stage_name(name)
        if stage in demos:
            predictor.demos = list(demos[stage])
    return program


def questions_of(examples: dict[str, list[dspy.Example]]) -> set[str]:
    """The questions a set of examples (by stage) shows: kept out of the chains a job runs on."""
    return {e.question for stage_examples in examples.values() for e in stage_examples}


def stage_name(predictor_name: str) -> str:
    """ "corrector.locate" -> "locate": demos and ground truth are keyed by stage, wherever it sits."""
    return predictor_name.rsplit(".", 1)[-1]


def demos_of(program: dspy.Module) -> dict[str, list[dspy.Example]]:
    """The demos a program's predictors hold, by stage (what `attach_demos` gave it)."""
    return {stage_name(name): list(p.demos) for name, p in program.named_predictors() if p.demos}


def chat_records(
    predictor: dspy.Predict, examples: list[dspy.Example], adapter: dspy.ChatAdapter | None = None
) -> list[dict]:
    """`examples` as chat fine-tuning records for `predictor`, formatted exactly as
    `BootstrapFinetune` formats traces (ChatAdapter, no demos in the prompt)."""
    adapter = adapter or dspy.ChatAdapter()
    signature = predictor.signature
    return [
        adapter.format_finetune_data(
            signature=signature,
            demos=[],
            inputs={k: example[k] for k in signature.input_fields},
            outputs={k: example[k] for k in signature.output_fields},
        )
        for example in examples
    ]


def ground_truth_chat_data(
    program: dspy.Module, examples: dict[str, list[dspy.Example]], adapter: dspy.ChatAdapter | None = None
) -> list[dict]:
    """Ground-truth examples (by stage name) as chat records for all of `program`'s predictors."""
    return [
        record
        for name, predictor in program.named_predictors()
        for record in chat_records(predictor, examples.get(stage_name(name), []), adapter)
    ]
