"""misstep: teach a local language model to find and recover from reasoning errors.

The public API, re-exported from the layers below (data, lm, signatures, programs,
metrics, optimize).
"""

import misstep.lm  # noqa: F401  (offline environment first)
from misstep.data import Chain, Scenario, load_big_bench_mistake, load_chains, load_gsm8k, sample_path
from misstep.lm import DEFAULT_MODEL, EmbeddedEngine, build_tiny_model, local_lm, resolve_model
from misstep.metrics.injector import inject, inject_many
from misstep.metrics.oracle import answers_match, first_error
from misstep.optimize.demos import attach_demos, ground_truth_demos
from misstep.optimize.jobs import JobSettings, evaluate, generate
from misstep.programs import Judge, ScenarioWriter, SelfCorrectionCycle, SelfCorrector
from misstep.signatures import ERROR_TYPES, DescribeMistake, register_error_type

__all__ = [
    "DEFAULT_MODEL",
    "ERROR_TYPES",
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
    "sample_path",
]
