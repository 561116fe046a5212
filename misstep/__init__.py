"""misstep: teach a local language model to find and recover from reasoning errors.

The public API, re-exported from the layers below (data, lm, signatures, programs,
metrics, optimize). Each name is imported when first used, so `import misstep` changes
nothing and imports nothing heavy: a script can call `misstep.offline()` before DSPy loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from misstep.offline import offline

if TYPE_CHECKING:  # the names, for readers and type checkers
    from misstep.data import Chain, Scenario, load_big_bench_mistake, load_chains, load_gsm8k, sample_path
    from misstep.lm import DEFAULT_MODEL, EmbeddedEngine, build_tiny_model, local_lm, resolve_model
    from misstep.metrics.injector import inject, inject_many
    from misstep.metrics.oracle import answers_match, first_error
    from misstep.optimize.demos import attach_demos, ground_truth_demos
    from misstep.optimize.jobs import JobSettings, evaluate, generate
    from misstep.programs import Judge, ScenarioWriter, SelfCorrectionCycle, SelfCorrector
    from misstep.programs.answer_format import AnswerAdapter
    from misstep.signatures import ERROR_TYPES, DescribeMistake, register_error_type

_HOMES = {
    "AnswerAdapter": "misstep.programs.answer_format",
    "Chain": "misstep.data",
    "DEFAULT_MODEL": "misstep.lm",
    "DescribeMistake": "misstep.signatures",
    "ERROR_TYPES": "misstep.signatures",
    "EmbeddedEngine": "misstep.lm",
    "JobSettings": "misstep.optimize.jobs",
    "Judge": "misstep.programs",
    "Scenario": "misstep.data",
    "ScenarioWriter": "misstep.programs",
    "SelfCorrectionCycle": "misstep.programs",
    "SelfCorrector": "misstep.programs",
    "answers_match": "misstep.metrics.oracle",
    "attach_demos": "misstep.optimize.demos",
    "build_tiny_model": "misstep.lm",
    "evaluate": "misstep.optimize.jobs",
    "first_error": "misstep.metrics.oracle",
    "generate": "misstep.optimize.jobs",
    "ground_truth_demos": "misstep.optimize.demos",
    "inject": "misstep.metrics.injector",
    "inject_many": "misstep.metrics.injector",
    "load_big_bench_mistake": "misstep.data",
    "load_chains": "misstep.data",
    "load_gsm8k": "misstep.data",
    "local_lm": "misstep.lm",
    "register_error_type": "misstep.signatures",
    "resolve_model": "misstep.lm",
    "sample_path": "misstep.data",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'misstep' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MODEL",
    "ERROR_TYPES",
    "AnswerAdapter",
    "Chain",
    "DescribeMistake",
    "EmbeddedEngine",
    "JobSettings",
    "Judge",
    "Scenario",
    "ScenarioWriter",
    "SelfCorrectionCycle",
    "SelfCorrector",
    "answers_match",
    "attach_demos",
    "build_tiny_model",
    "evaluate",
    "first_error",
    "generate",
    "ground_truth_demos",
    "inject",
    "inject_many",
    "load_big_bench_mistake",
    "load_chains",
    "load_gsm8k",
    "local_lm",
    "register_error_type",
    "resolve_model",
    "offline",
    "sample_path",
]
