"""A DSPy fine-tuning provider for local models: `BootstrapFinetune` hands it chat data, it
trains a new checkpoint with `misstep.lm.training`, and the compiled LM points at it.

DSPy's own `LocalProvider` needs SGLang and is stale against transformers 5, hence
this one. DSPy calls `finetune` on a thread and then copies the LM under the name it
returns; that copy still holds the old engine, so `engine_for` gives the compile an
engine over the new weights to swap in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat

from misstep.lm.client import lm_name
from misstep.lm.engine import EmbeddedEngine
from misstep.lm.training import TrainSettings, train_chat


class LocalTrainingJob(TrainingJob):
    def status(self) -> str:
        return "done" if self.done() else "running"


class LocalProvider(Provider):
    """Trains local Hugging Face checkpoints under `checkpoint_root`, one folder per compile.

    `train_kwargs` (from `BootstrapFinetune(train_kwargs=...)`) may hold a `TrainSettings`
    under "settings"; `base_model_dir` is the folder the student's LM runs.
    """

    def __init__(self, base_model_dir: Path, checkpoint_root: Path, settings: TrainSettings | None = None,
                 show_progress: bool = True):
        super().__init__()
        self.finetunable = True
        self.TrainingJob = LocalTrainingJob
        self.base_model_dir = Path(base_model_dir)
        self.checkpoint_root = Path(checkpoint_root)
        self.settings = settings or TrainSettings()
        self.show_progress = show_progress
        self.checkpoints: dict[str, Path] = {}  # model name -> folder, for every compile so far
        self.summaries: dict[str, dict[str, Any]] = {}

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None, train_kwargs: dict[str, Any] | None = None) -> str:
        if train_data_format not in (TrainDataFormat.CHAT, "chat"):
            raise ValueError(f"LocalProvider trains on chat data, not {train_data_format!r} (use ChatAdapter)")
        settings = (train_kwargs or {}).get("settings") or self.settings
        source = self.checkpoints.get(model, self.base_model_dir)  # a compiled model compiles on from its own weights
        folder = self.checkpoint_root / f"compile-{time.strftime('%Y%m%d-%H%M%S')}-{len(self.checkpoints):03d}"
        folder.mkdir(parents=True)
        with (folder / "train_data.jsonl").open("w") as out:  # the exact data, kept beside the weights
            for record in train_data:
                out.write(json.dumps(record) + "\n")
        summary = train_chat(source, train_data, folder, settings, show_progress=self.show_progress)
        name = lm_name(folder)  # the weights' hash is in the name: no stale cached answers
        self.checkpoints[name] = folder
        self.summaries[name] = summary
        return name

    def adopt(self, name: str, folder: Path) -> None:
        """Know an existing checkpoint (say, from a resumed run) so compiles train on from it."""
        self.checkpoints[name] = Path(folder)
        summary = Path(folder) / "train_summary.json"
        self.summaries[name] = json.loads(summary.read_text()) if summary.exists() else {}

    def engine_for(self, lm, **engine_options):
        """An engine over the checkpoint `lm` is named after (None if it names no new checkpoint)."""
        folder = self.checkpoints.get(lm.model)
        if folder is None:
            return None
        return EmbeddedEngine(folder, **engine_options)
