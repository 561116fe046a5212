"""An embedded engine over weights that are not there yet: a run carried to another machine without
its weights (scripts/carry_run.py) names checkpoints that training must make again, and making each
one costs many minutes. `PendingEngine` stands in for the `EmbeddedEngine` until the first request,
which makes the weights (`make`, say `LocalProvider.ensure_weights`) and loads them; a resumed step
whose model is never asked anything costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from misstep.lm.engine import EmbeddedEngine, EngineSettings


class PendingEngine:
    """A DSPy engine (`complete(Request) -> Response`) that makes its weights on the first request."""

    def __init__(
        self, model_dir: Path | str, make: Callable[[], None], settings: EngineSettings | None = None, **overrides
    ):
        self.model_dir = Path(model_dir)
        self.settings = replace(settings or EngineSettings(), **overrides)
        self._make = make
        self._engine: EmbeddedEngine | None = None
        self._lock = threading.Lock()  # DSPy's threads ask at once: the weights are made once

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def engine(self) -> EmbeddedEngine:
        """The engine over the weights, made and loaded on the first call."""
        with self._lock:
            if self._engine is None:
                self._make()
                self._engine = EmbeddedEngine(self.model_dir, self.settings)
            return self._engine

    def complete(self, request):
        return self.engine().complete(request)

    def stream(self, request):
        return self.engine().stream(request)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.close()
