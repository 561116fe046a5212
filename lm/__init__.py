"""The local-model layer: base-model registry and conversion, and the embedded engine.

Weights are only ever read from folders on disk (`local_files_only`); nothing here changes the
process's environment (the command line's `misstep.offline()` does, before DSPy loads)."""

from misstep.lm.client import CHAT_STOP, engine_stats, lm_name, local_lm, release
from misstep.lm.engine import EmbeddedEngine, EngineSettings, EngineStats
from misstep.lm.models import (
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
