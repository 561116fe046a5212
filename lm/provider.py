"""A DSPy fine-tuning provider for local models: `BootstrapFinetune` hands it chat data, it
trains a new checkpoint with `misstep.lm.training`, and the compiled LM points at it.

DSPy's own `LocalProvider` needs SGLang and is stale against transformers 5, hence
this one. It serves its checkpoints one of two ways, chosen by `serving`:

- "embedded": in this process, on `EmbeddedEngine` (the default; needs nothing more);
- "vllm": each checkpoint on its own vLLM OpenAI-compatible server on 127.0.0.1,
  talked to as `hosted_vllm/<name>` (`launch`/`kill` start and stop it).

DSPy calls `finetune` on a thread and then copies the LM under the name it returns;
that copy still points at the old weights, so `lm_for` gives the compile an LM over
the new ones to swap in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import dspy
from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat

from misstep.data.runfiles import read_records, write_json_atomic, write_jsonl_atomic
from misstep.lm.checkpoint import SUMMARY, TRAIN_LOG, adapter_problem, checkpoint_problem, recorded_digests
from misstep.lm.client import lm_name, local_lm, served_lm
from misstep.lm.engine import EmbeddedEngine, EngineSettings
from misstep.lm.kernels import on_torch_thread
from misstep.lm.launch import train
from misstep.lm.pending import PendingEngine
from misstep.lm.serving import VllmOptions, VllmServer
from misstep.lm.training import TrainSettings, data_key, merge_adapter

logger = logging.getLogger(__name__)

SERVINGS = ("embedded", "vllm")
TRAIN_DATA = "train_data.jsonl"  # the exact records a checkpoint was trained on, kept beside its weights
REPLAYED = "train_replayed.json"  # a checkpoint made again from its records: whether it came out the same
FIRST = "first_"  # the first training's summary and log, kept beside a checkpoint made again


class LocalTrainingJob(TrainingJob):
    def status(self) -> str:
        return "done" if self.done() else "running"


class LocalProvider(Provider):
    """Trains local Hugging Face checkpoints under `checkpoint_root`, one folder per compile.

    `train_kwargs` (from `BootstrapFinetune(train_kwargs=...)`) may hold a `TrainSettings`
    under "settings"; `base_model_dir` is the folder the student starts from.
    """

    def __init__(
        self,
        base_model_dir: Path,
        checkpoint_root: Path,
        settings: TrainSettings | None = None,
        show_progress: bool = True,
        serving: str = "embedded",
        vllm: VllmOptions | None = None,
        engine: EngineSettings | None = None,
    ):
        super().__init__()
        if serving not in SERVINGS:
            raise ValueError(f"serving must be one of {SERVINGS}, not {serving!r}")
        self.finetunable = True
        self.TrainingJob = LocalTrainingJob
        self.base_model_dir = Path(base_model_dir)
        self.checkpoint_root = Path(checkpoint_root)
        self.settings = settings or TrainSettings()
        self.show_progress = show_progress
        self.serving = serving
        self.vllm = vllm or VllmOptions()
        self.engine = engine or EngineSettings()  # for the in-process engines (serving="embedded")
        self._folders: dict[str, Path] = {}  # model name -> weights folder: DSPy names models, not folders
        self._making = threading.RLock()  # one checkpoint made again at a time (and those it starts from)
        self.servers: dict[str, VllmServer] = {}  # model name -> its vLLM server (serving="vllm")

    # -- naming and serving ---------------------------------------------------------------

    def name_for(self, folder: Path) -> str:
        return lm_name(folder, prefix="hosted_vllm" if self.serving == "vllm" else "local")

    def lm(self, folder: Path | None = None, *, max_batch_size: int | None = None, **lm_options) -> dspy.LM:
        """A fine-tunable LM over `folder` (default: the base model), served this provider's way.

        `lm_options` go to the LM: temperature, max_tokens, seed, cache."""
        folder = Path(folder or self.base_model_dir)
        name = self.name_for(folder)
        self._folders.setdefault(name, folder)
        if self.serving == "embedded":
            engine = None
            if self.replayable(folder) and checkpoint_problem(folder) is not None:  # made on the first request
                overrides = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
                engine = PendingEngine(folder, lambda: self.ensure_weights(folder), self.engine, **overrides)
            return local_lm(
                folder,
                engine=engine,
                engine_settings=self.engine,
                max_batch_size=max_batch_size,
                provider=self,
                **lm_options,
            )
        return served_lm(self._server(name), provider=self, **lm_options)

    def _server(self, name: str) -> VllmServer:
        if name not in self.servers:
            folder = self._folders[name]
            self.ensure_weights(folder)
            served = name.split("/", 1)[1]
            self.servers[name] = VllmServer(
                folder, served, self.checkpoint_root / "vllm-logs" / f"{served}.log", self.vllm
            )
        return self.servers[name].start()

    def launch(self, lm: dspy.LM, launch_kwargs: dict[str, Any] | None = None) -> None:
        if self.serving == "vllm":
            self._server(lm.model)

    def kill(self, lm: dspy.LM, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Free what serves `lm` (DSPy calls this before training it); `launch` brings it back.

        The base model's server stays up: the frozen judge runs on it, and would otherwise
        lose its server the first time the student is trained from the base weights."""
        if lm.model in self.servers and self._folders.get(lm.model) != self.base_model_dir:
            self.servers[lm.model].stop()

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()

    def folder_of(self, lm: dspy.LM | str) -> Path:
        """The weights folder behind `lm` (or a model name) this provider served or trained."""
        return self._folders[lm if isinstance(lm, str) else lm.model]

    def lm_for(self, lm: dspy.LM) -> dspy.LM:
        """A copy of `lm` (named after a checkpoint of this provider) that runs that checkpoint's weights."""
        folder = self.folder_of(lm)
        if self.serving == "embedded":
            known = isinstance(lm.engine, (EmbeddedEngine, PendingEngine))
            engine = EmbeddedEngine(folder, lm.engine.settings if known else None)
            return lm.copy(engine=engine)
        server = self._server(lm.model)
        return lm.copy(api_base=server.api_base, api_key=server.api_key)  # each server has its own key

    # -- training -------------------------------------------------------------------------

    def finetune(
        self,
        job: TrainingJob,
        model: str,
        train_data: list[dict[str, Any]],
        train_data_format: TrainDataFormat | str | None,
        train_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if train_data_format not in (TrainDataFormat.CHAT, "chat"):
            raise ValueError(f"LocalProvider trains on chat data, not {train_data_format!r} (use ChatAdapter)")
        settings = (train_kwargs or {}).get("settings") or self.settings
        source = self._folders.get(model, self.base_model_dir)  # a compiled model compiles on from its own weights
        self.ensure_weights(source)
        # Named by what it is trained from, on and how: a rerun after a kill finds the folder again
        # and resumes there (or, finished and whole, reads it back) instead of starting afresh.
        identity = hashlib.sha256(f"{Path(source).resolve()}\n{data_key(train_data, settings)}".encode())
        folder = self.checkpoint_root / f"compile-{identity.hexdigest()[:16]}"
        if checkpoint_problem(folder) is not None:  # not trained yet, or not whole
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl_atomic(folder / TRAIN_DATA, train_data)  # the exact data, kept beside the weights
            # on the process's torch thread, where the engines run too: a second thread's OpenMP pool
            # slows both down (lm/kernels.py; 2.85 vs 2.56 s a training step measured)
            on_torch_thread(train, source, train_data, folder, settings, show_progress=self.show_progress)
        name = self.name_for(folder)
        self._folders[name] = folder
        return name

    # -- weights that did not travel ------------------------------------------------------

    def replayable(self, folder: Path) -> bool:
        """Whether `folder` was trained by a provider and kept what it takes to train it again: its
        records and its summary (the settings and the weights it started from)."""
        try:
            summary = json.loads((Path(folder) / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return False
        return (Path(folder) / TRAIN_DATA).exists() and {"settings", "base_model"} <= summary.keys()

    def ensure_weights(self, folder: Path) -> None:
        """Make `folder`'s weights whole where they are missing or cut short (a run carried between
        machines without them), from the weights it started from (made whole first, the same way):
        a LoRA training's adapter merged into them where the adapter is there as recorded (seconds),
        else trained again on its records, with its settings. `folder`/train_replayed.json says how,
        and whether they came out as the first time's; the first training's summary and log stay
        beside it as first_train_summary.json and first_train_log.jsonl. A folder that is whole, or
        that no provider trained (the base model), is left as it is."""
        folder = Path(folder)
        if not self.replayable(folder):
            return
        with self._making:
            problem = checkpoint_problem(folder)
            if problem is None:
                return
            summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
            source = Path(summary["base_model"])
            self.ensure_weights(source)
            if not source.exists():
                raise FileNotFoundError(f"{folder / SUMMARY}: base_model {source} is not there to train it again from")
            merge = adapter_problem(folder) is None
            logger.info("%s: made again from its %s (%s)", folder, "adapter" if merge else "records", problem)
            started = time.perf_counter()
            first = recorded_digests(folder)
            # Making them again rewrites the summary (and training, the log); the first training's
            # (its wall time, its losses) are the run's evidence, so they stay beside them.
            for name in (SUMMARY, TRAIN_LOG):
                if (folder / name).exists() and not (folder / f"{FIRST}{name}").exists():
                    shutil.copy2(folder / name, folder / f"{FIRST}{name}")
            if merge:
                weights = on_torch_thread(merge_adapter, source, folder)
                write_json_atomic(folder / SUMMARY, {**summary, "weights": weights})
            else:
                try:
                    settings = TrainSettings(**summary["settings"])
                except TypeError as exc:  # a setting since renamed or removed
                    raise ValueError(f"{folder / SUMMARY}: its settings are not this version's ({exc})") from None
                records = read_records(folder / TRAIN_DATA)
                on_torch_thread(train, source, records, folder, settings, show_progress=self.show_progress)
            same = recorded_digests(folder) == first if first else None
            write_json_atomic(
                folder / REPLAYED,
                {
                    "because": problem,
                    "how": "merged its adapter" if merge else "trained on its records",
                    "trained_from": str(source),
                    "same_weights": same,
                    "first_weights": first,
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )
            logger.log(
                logging.WARNING if same is False else logging.INFO,
                "%s trained again: weights %s",
                folder,
                {True: "the same as the first time", False: "differ from the first time's", None: "made"}[same],
            )
