"""The parts of DSPy that misstep uses although they are not DSPy's documented API, in one place.

`RobustBootstrapFinetune` (optimize/compile.py) re-runs `BootstrapFinetune.compile` with failed
traces dropped; for that it needs the helpers `compile` itself calls. When DSPy is upgraded and
one of them changes, `tests/test_dspy_internals.py` fails naming it, instead of a compile
breaking silently: compare the new signature with `RECORDED`, adapt compile.py, record it anew.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from dspy.teleprompt.bootstrap_finetune import BootstrapFinetune, assert_all_predictors_have_lms, prepare_teacher
from dspy.teleprompt.bootstrap_trace import FailedPrediction, bootstrap_trace_data

# Each internal used, with its signature under the DSPy version pyproject.toml pins.
USED: dict[str, Callable] = {
    "dspy.teleprompt.bootstrap_finetune.assert_all_predictors_have_lms": assert_all_predictors_have_lms,
    "dspy.teleprompt.bootstrap_finetune.prepare_teacher": prepare_teacher,
    "dspy.teleprompt.bootstrap_trace.bootstrap_trace_data": bootstrap_trace_data,
    "dspy.teleprompt.bootstrap_finetune.BootstrapFinetune._prepare_finetune_data": BootstrapFinetune._prepare_finetune_data,
    "dspy.teleprompt.bootstrap_finetune.BootstrapFinetune.finetune_lms": BootstrapFinetune.finetune_lms,
    "dspy.teleprompt.bootstrap_finetune.BootstrapFinetune.__init__": BootstrapFinetune.__init__,
}
RECORDED: dict[str, str] = {  # verbatim, one a line (hence no line-length limit in this file)
    "dspy.teleprompt.bootstrap_finetune.assert_all_predictors_have_lms": "(program: dspy.primitives.module.Module, role: str = 'program') -> None",
    "dspy.teleprompt.bootstrap_finetune.prepare_teacher": "(student: dspy.primitives.module.Module, teacher: dspy.primitives.module.Module | None = None) -> dspy.primitives.module.Module",
    "dspy.teleprompt.bootstrap_trace.bootstrap_trace_data": "(program: dspy.primitives.module.Module, dataset: list[dspy.primitives.example.Example], metric: Optional[Callable] = None, num_threads: int | None = None, raise_on_error=True, capture_failed_parses=False, failure_score: float = 0, format_failure_score: float = -1, log_format_failures: bool = False, callback_metadata: dict[str, typing.Any] | None = None, capture_crashes: bool = False) -> list[dspy.teleprompt.bootstrap_trace.TraceData]",
    "dspy.teleprompt.bootstrap_finetune.BootstrapFinetune._prepare_finetune_data": "(self, trace_data: list[dict[str, typing.Any]], lm: dspy.clients.lm.LM, pred_ind: int | None = None)",
    "dspy.teleprompt.bootstrap_finetune.BootstrapFinetune.finetune_lms": "(finetune_dict) -> dict[typing.Any, dspy.clients.lm.LM]",
    "dspy.teleprompt.bootstrap_finetune.BootstrapFinetune.__init__": "(self, metric: Optional[Callable] = None, multitask: bool = True, train_kwargs: dict[str, typing.Any] | dict[dspy.clients.lm.LM, dict[str, typing.Any]] | None = None, adapter: dspy.adapters.base.Adapter | dict[dspy.clients.lm.LM, dspy.adapters.base.Adapter] | None = None, exclude_demos: bool = False, num_threads: int | None = None)",
}


def changed() -> dict[str, str]:
    """The internals whose signature is not the recorded one: name -> the signature found now."""
    return {name: str(inspect.signature(f)) for name, f in USED.items() if str(inspect.signature(f)) != RECORDED[name]}


__all__ = [
    "BootstrapFinetune",
    "FailedPrediction",
    "assert_all_predictors_have_lms",
    "bootstrap_trace_data",
    "prepare_teacher",
    "changed",
]
