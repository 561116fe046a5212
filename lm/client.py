"""`local_lm`: a `dspy.LM` over a local model, the one door the programs use to reach weights."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import dspy

from misstep.lm.engine import EmbeddedEngine, EngineSettings
from misstep.lm.models import DEFAULT_MODEL, fingerprint, resolve_model
from misstep.lm.pending import PendingEngine

# ChatAdapter ends every answer with this marker; stopping there saves a small model
# from rambling on to its token limit (the adapter parses fields, not the marker).
CHAT_STOP = ("[[ ## completed ## ]]",)


def lm_name(model_dir: Path, prefix: str = "local") -> str:
    """`<prefix>/<folder>-<weights hash>`: DSPy caches by model name alone, so new weights need a new
    name. The prefix is how LiteLLM routes it: `local` for the embedded engine, `hosted_vllm` for a server."""
    return f"{prefix}/{model_dir.name}-{fingerprint(model_dir)}"


def local_lm(
    model: str | Path = DEFAULT_MODEL,
    *,
    engine: EmbeddedEngine | PendingEngine | None = None,
    engine_settings: EngineSettings | None = None,
    temperature: float = 0.0,
    max_tokens: int = 384,
    seed: int | None = 0,
    cache: bool = True,
    max_batch_size: int | None = None,
    cache_dir: Path | str | None = None,
    provider=None,
) -> dspy.LM:
    """A `dspy.LM` whose requests run in-process on `model` (a registry name or a model folder).

    Pass `engine` to share one loaded model between several LMs (say, student and judge
    at different temperatures), and a `LocalProvider` to make the LM fine-tunable. A new
    engine runs with `engine_settings` (and `max_batch_size`, where given, on top).
    """
    model_dir = engine.model_dir if engine is not None else resolve_model(model, cache_dir)
    if engine is None:
        overrides = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
        engine = EmbeddedEngine(model_dir, engine_settings, **overrides)
    return dspy.LM(
        lm_name(model_dir),
        engine=engine,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        stop=list(CHAT_STOP),
        cache=cache,
        num_retries=0,
        provider=provider,
    )


def served_lm(
    server,
    *,
    temperature: float = 0.0,
    max_tokens: int = 384,
    seed: int | None = 0,
    cache: bool = True,
    provider=None,
    num_retries: int = 30,
) -> dspy.LM:
    """A `dspy.LM` over a running `VllmServer`, as `hosted_vllm/<served name>`.

    Connection errors are retried with exponential backoff (capped at 10 s a wait), for
    longer than the server's watchdog takes to restart a dead server: no request is lost.
    """
    return dspy.LM(
        f"hosted_vllm/{server.served_name}",
        api_base=server.api_base,
        api_key=server.api_key,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        stop=list(CHAT_STOP),
        cache=cache,
        num_retries=num_retries,
        provider=provider,
    )


def engine_stats(lm: dspy.LM) -> dict[str, Any] | None:
    """What the in-process engine behind `lm` did so far (`EngineStats`); None for a served LM."""
    engine = getattr(lm, "engine", None)
    if isinstance(engine, PendingEngine):
        engine = engine.engine() if engine.loaded else None
    return asdict(engine.stats) if isinstance(engine, EmbeddedEngine) else None


def release(lm: dspy.LM) -> None:
    """Close the in-process engine behind `lm`, and its weights go with it; a served LM has none here."""
    engine = getattr(lm, "engine", None)
    if isinstance(engine, (EmbeddedEngine, PendingEngine)):
        engine.close()
