"""Constrained decoding: each stage's answer grammar, and the embedded engine decoding under it.

The tiny random-weight model is the hardest case there is: left to itself it never writes the
adapter's format, so every answer that parses here parses because of the constraint.
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import dspy
import pytest
import xgrammar as xgr
from transformers import AutoConfig, AutoTokenizer

from misstep.data.records import format_steps
from misstep.lm import EmbeddedEngine, local_lm
from misstep.lm.constraint import Grammars
from misstep.programs.answer_format import AnswerAdapter, GrammarError, answer_format
from misstep.programs.stage import STAGE_MAX_TOKENS
from misstep.signatures import (
    CurateScenario,
    DescribeMistake,
    JudgeRecovery,
    LocateFirstError,
    RecoverFromError,
    WriteMistakenChain,
)
from misstep.signatures.fields import StepNumber

CHAIN = format_steps(["2 + 3 = <<2+3=5>>5", "5 * 4 = <<5*4=20>>20", "20 - 1 = <<20-1=19>>19"])
STAGES = {  # stage: (signature, inputs, a correct answer)
    "describe": (
        DescribeMistake,
        {"question": "q?", "valid_chain": CHAIN},
        {"mistake_step": 2, "mistake_description": "multiplies by 5 instead of 4"},
    ),
    "corrupt": (
        WriteMistakenChain,
        {"question": "q?", "valid_chain": CHAIN, "mistake_step": 2, "mistake_description": "adds"},
        {"invalid_chain": "Step 1: 2 + 3 = 5\nStep 2: 5 + 4 = 9", "invalid_answer": "9"},
    ),
    "locate": (
        LocateFirstError,
        {"question": "q?", "chain": CHAIN},
        {"has_mistake": True, "first_error_step": 3},
    ),
    "recover": (
        RecoverFromError,
        {"question": "q?", "chain": CHAIN, "first_error_step": 2},
        {"recovered_steps": "Step 2: 5 * 4 = 20\nStep 3: 20 - 1 = 19", "final_answer": "19"},
    ),
    "judge": (
        JudgeRecovery,
        {"question": "q?", "invalid_chain": CHAIN, "recovery": "r", "correct_chain": CHAIN},
        {"recovery_succeeded": False, "confidence": 0.85},
    ),
    "curate": (
        CurateScenario,
        {
            "question": "q?",
            "correct_chain": CHAIN,
            "mistake_description": "d",
            "invalid_chain": CHAIN,
            "first_error_step": 2,
            "recovery": "r",
            "recovery_succeeded": True,
        },
        {"keep": True, "quality": 1.0, "reason": "a real slip [sic], found and fixed"},
    ),
}


@pytest.fixture(scope="module")
def grammars(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    return Grammars(tokenizer, AutoConfig.from_pretrained(tiny_model_dir).vocab_size)


def _accepts(grammars: Grammars, grammar: str, text: str) -> bool:
    """Whether `text` is a whole answer of `grammar`."""
    matcher = xgr.GrammarMatcher(grammars.compiler.compile_grammar(grammar))
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.mark.parametrize("stage", STAGES)
def test_each_signatures_grammar_takes_the_adapters_answer_and_refuses_malformed_ones(grammars, stage):
    signature, inputs, outputs = STAGES[stage]
    grammar = answer_format(signature, inputs).grammar
    answer = dspy.ChatAdapter().format_assistant_message_content(signature, outputs).rstrip("\n")
    assert _accepts(grammars, grammar, answer)
    first = next(iter(signature.output_fields))
    assert not _accepts(grammars, grammar, answer.replace(f"[[ ## {first} ## ]]", f"[ ## {first} ## ]"))
    assert not _accepts(grammars, grammar, answer.replace("[[ ## completed ## ]]", "[## completed ##]"))
    assert not _accepts(grammars, grammar, answer + "\nmore text")
    assert not _accepts(grammars, grammar, answer.rsplit("\n\n", 1)[0])  # never closed


def test_a_step_number_stays_within_the_chains_steps_and_a_score_within_zero_and_one(grammars):
    grammar = answer_format(LocateFirstError, {"question": "q?", "chain": CHAIN}).grammar

    def located(step: str) -> str:
        return f"[[ ## has_mistake ## ]]\nTrue\n\n[[ ## first_error_step ## ]]\n{step}\n\n[[ ## completed ## ]]"

    assert [_accepts(grammars, grammar, located(s)) for s in ("0", "1", "3", "4", "12", "-1", "two")] == [
        True,
        True,
        True,
        False,  # the chain has three steps
        False,
        False,
        False,
    ]
    five_steps = answer_format(LocateFirstError, {"question": "q?", "chain": CHAIN + "\nStep 4: a\nStep 5: b"})
    assert _accepts(grammars, five_steps.grammar, located("5"))
    odd_steps = format_steps(["a", "", "two\nlines", "d"])  # a step may be empty, or hold a line break
    assert _accepts(grammars, answer_format(LocateFirstError, {"chain": odd_steps}).grammar, located("4"))
    assert not _accepts(grammars, answer_format(LocateFirstError, {"chain": odd_steps}).grammar, located("5"))
    judged = answer_format(JudgeRecovery, STAGES["judge"][1]).grammar

    def scored(score: str) -> str:
        return f"[[ ## recovery_succeeded ## ]]\nTrue\n\n[[ ## confidence ## ]]\n{score}\n\n[[ ## completed ## ]]"

    assert [_accepts(grammars, judged, scored(s)) for s in ("0.9", "1", "1.0", "0", "1.5", "2", "-0.1", "high")] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_free_text_cannot_open_a_marker(grammars):
    signature, inputs, outputs = STAGES["recover"]
    grammar = answer_format(signature, inputs).grammar
    answer = dspy.ChatAdapter().format_assistant_message_content(signature, outputs).rstrip("\n")
    assert _accepts(grammars, grammar, answer.replace("Step 3", "Step [3]"))
    assert not _accepts(grammars, grammar, answer.replace("Step 3", "[[ ## final_answer ## ]]\n3"))


def test_a_field_type_no_grammar_can_express_is_refused_by_name():
    class Listing(dspy.Signature):
        question: str = dspy.InputField()
        steps: list[str] = dspy.OutputField()

    with pytest.raises(GrammarError, match=r"Listing\.steps.*list\[str\]"):
        answer_format(Listing, {"question": "q"})

    class Unnamed(dspy.Signature):
        question: str = dspy.InputField()
        step: Annotated[int, StepNumber("chain")] = dspy.OutputField()

    with pytest.raises(GrammarError, match=r"Unnamed\.step.*names no input field"):
        answer_format(Unnamed, {"question": "q"})


def _answer_all(engine: EmbeddedEngine, temperature: float, constrained: bool, together: bool) -> dict:
    """Each stage once, at its own token limit: all at once (one batch) or one after another."""

    def answer(stage: str):
        signature, inputs, _ = STAGES[stage]
        lm = local_lm(engine=engine, max_tokens=STAGE_MAX_TOKENS[stage], temperature=temperature, cache=False)
        with dspy.context(lm=lm, adapter=AnswerAdapter(constrained)):
            try:
                return dict(dspy.Predict(signature)(**inputs).items())
            except Exception as exc:  # an answer that does not parse
                return exc

    if together:
        with ThreadPoolExecutor(len(STAGES)) as pool:
            return dict(zip(STAGES, pool.map(answer, STAGES)))
    return {stage: answer(stage) for stage in STAGES}


def test_random_weights_answer_in_every_stages_format_only_under_the_constraint(tiny_engine):
    constraint_time = tiny_engine.stats.constraint_seconds
    unconstrained = _answer_all(tiny_engine, 0.0, constrained=False, together=True)
    assert all(isinstance(a, Exception) for a in unconstrained.values()), unconstrained
    assert tiny_engine.stats.constraint_seconds == constraint_time  # the stats time the constraint's code alone
    before = tiny_engine.stats.constrained
    for temperature in (0.0, 1.0):
        answers = _answer_all(tiny_engine, temperature, constrained=True, together=True)
        failed = {stage: a for stage, a in answers.items() if isinstance(a, Exception)}
        assert not failed, (temperature, failed)
        for stage, outputs in answers.items():
            assert set(outputs) == set(STAGES[stage][0].output_fields)
        assert 0 <= answers["locate"]["first_error_step"] <= 3
        assert 1 <= answers["describe"]["mistake_step"] <= 3
        assert 0.0 <= answers["judge"]["confidence"] <= 1.0
    assert tiny_engine.stats.constrained - before == 2 * len(STAGES)
    stats = tiny_engine.stats
    assert 0 < stats.constraint_seconds - constraint_time < stats.busy_seconds - stats.prefill_seconds


def test_speculation_and_batching_keep_the_constrained_greedy_answer(tiny_model_dir, tiny_engine):
    """Drafts (copied and the draft model's) and forced markers are checked against the masked greedy
    pick, so the answers of a batch with speculation equal those of one request at a time without it."""
    batched = _answer_all(tiny_engine, 0.0, constrained=True, together=True)
    plain = EmbeddedEngine(tiny_model_dir, speculate=0, max_batch_size=1)
    try:
        alone = _answer_all(plain, 0.0, constrained=True, together=False)
    finally:
        plain.close()
    assert alone == batched
    assert plain.stats.drafted_tokens == 0


def test_an_answer_is_closed_in_time_when_free_text_would_run_past_the_limit(tiny_engine):
    """The random model never ends a free-text field by itself: each one is cut where the rest of
    the answer still fits, and the answer parses within its token limit."""
    signature, inputs, _ = STAGES["recover"]
    for max_tokens in (40, 90):
        lm = local_lm(engine=tiny_engine, max_tokens=max_tokens, temperature=1.0, cache=False)
        with dspy.context(lm=lm, adapter=AnswerAdapter()):
            answer = dspy.Predict(signature)(**inputs)
        assert set(answer.keys()) == {"recovered_steps", "final_answer"}
        assert lm.history[-1]["usage"]["completion_tokens"] <= max_tokens
