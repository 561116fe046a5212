"""Shared fixtures: a tiny random-weight model with the real SmolLM2 tokenizer, built once per session.

Everything runs offline: DSPy's cache and misstep's model cache point into a
temporary folder, so tests neither read nor pollute the user's caches.
"""

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="misstep-tests-"))
os.environ["DSPY_CACHEDIR"] = str(_SESSION_DIR / "dspy-cache")  # read when dspy is imported
os.environ.setdefault("MISSTEP_CACHE_DIR", str(_SESSION_DIR / "misstep-cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import pytest  # noqa: E402

from misstep.data import load_chains, sample_path  # noqa: E402
from misstep.lm import EmbeddedEngine, build_tiny_model, local_lm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(_SESSION_DIR / "tiny-model", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, max_batch_size=8)
    yield engine
    engine.close()


@pytest.fixture()
def tiny_lm(tiny_engine):
    """A fresh, uncached LM over the shared tiny engine, answering at most 24 tokens."""
    return local_lm(engine=tiny_engine, max_tokens=24, cache=False)


@pytest.fixture(scope="session")
def gsm8k_train():
    return load_chains(sample_path("gsm8k/train.jsonl"))


@pytest.fixture(scope="session")
def gsm8k_test():
    return load_chains(sample_path("gsm8k/test.jsonl"))
