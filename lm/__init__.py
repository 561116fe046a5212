"""The local-model layer: base-model registry and conversion, and the embedded engine."""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch a price map
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from misstep.lm.client import CHAT_STOP, engine_stats, lm_name, local_lm, release  # noqa: E402
from misstep.lm.engine import EmbeddedEngine, EngineSettings, EngineStats  # noqa: E402
from misstep.lm.models import (  # noqa: E402
    DEFAULT_MODEL,
    REGISTRY,
    ModelNotFoundError,
    build_tiny_model,
    cache_dir,
    fingerprint,
    resolve_model,
)

__all__ = [
    "CHAT_STOP",
    "DEFAULT_MODEL",
    "REGISTRY",
    "EmbeddedEngine",
    "EngineSettings",
    "EngineStats",
    "ModelNotFoundError",
    "build_tiny_model",
    "cache_dir",
    "engine_stats",
    "fingerprint",
    "lm_name",
    "local_lm",
    "release",
    "resolve_model",
]
