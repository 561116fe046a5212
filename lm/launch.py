"""Training under a distributed launcher, and `train`, the door to new weights.

`train` trains in this process, or, with `settings.launcher` (say "torchrun --standalone
--nproc-per-node 4" or "accelerate launch --num_processes 4"), in the processes that launcher
starts, one per GPU (or CPU process, over gloo), each running `train_chat` on its share of
every batch; this process waits for them and reads rank 0's summary. Configuration only: the
same loop runs either way.

    python -m misstep.lm.launch MODEL_DIR RECORDS.jsonl OUTPUT_DIR --settings settings.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from misstep.data.runfiles import read_records, write_json_atomic
from misstep.lm.checkpoint import SUMMARY
from misstep.lm.processes import stop_group
from misstep.lm.training import KEPT_UNTIL_EXIT, TrainSettings, train_chat

# How long a launcher gets to pass SIGTERM on to its workers before its group is killed.
STOP_GRACE_S = 15.0


def train(
    model_dir: Path,
    records: list[dict[str, Any]],
    output_dir: Path,
    settings: TrainSettings,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `model_dir` on chat `records` into `output_dir` (see `train_chat`), under
    `settings.launcher` where there is one; the training's summary."""
    if not settings.launcher:
        return train_chat(model_dir, records, output_dir, settings, show_progress=show_progress)
    if not records:
        raise ValueError("no training records: nothing to fine-tune on")
    return launch_training(model_dir, records, output_dir, settings)


def launch_training(
    model_dir: Path, records: list[dict[str, Any]], output_dir: Path, settings: TrainSettings
) -> dict[str, Any]:
    """Run `train_chat` under `settings.launcher` (torchrun, accelerate launch, ...) and return its summary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    data, config = output_dir / "launch_records.jsonl", output_dir / "launch_settings.json"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config.write_text(json.dumps({**asdict(settings), "launcher": None}))
    command = [
        *shlex.split(settings.launcher),
        "-m",
        "misstep.lm.launch",
        str(model_dir),
        str(data),
        str(output_dir),
        "--settings",
        str(config),
    ]
    log = output_dir / "launch.log"
    with log.open("w") as out:
        # Its own session, so that a launch that runs out of time goes with all its processes.
        launched = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode, peak_gib = _wait_watching_memory(launched, settings.launch_timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(launched, STOP_GRACE_S)
            raise RuntimeError(
                f"training under {settings.launcher!r} ran past launch_timeout_s="
                f"{settings.launch_timeout_s} s and was killed; log {log}:\n{log.read_text()[-3000:]}"
            ) from None
        except BaseException:  # interrupted: do not leave the processes training on
            stop_group(launched, STOP_GRACE_S)
            raise
    if returncode != 0:
        tail = log.read_text()[-3000:]
        if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) or KILLED_IN_LOG.search(tail):
            raise TrainingKilled(_killed_message(settings, peak_gib, log)) from None
        raise RuntimeError(f"training under {settings.launcher!r} failed (exit {returncode}); log {log}:\n{tail}")
    data.unlink()
    summary_path = output_dir / SUMMARY
    summary = json.loads(summary_path.read_text())
    summary["settings"]["launcher"] = settings.launcher  # the processes ran without one: record it
    write_json_atomic(summary_path, summary)
    return summary


class TrainingKilled(RuntimeError):
    """A launched training's process was killed by SIGKILL: on a machine, the out-of-memory killer."""


# How launchers report a worker that SIGKILL ended: torchrun ("Signals.SIGKILL", "exitcode  : -9"),
# accelerate (which runs torchrun), a shell ("Killed").
KILLED_IN_LOG = re.compile(r"Signals\.SIGKILL|exitcode\s*:\s*-9\b|^Killed$", re.MULTILINE)


def _wait_watching_memory(process: subprocess.Popen, timeout_s: float | None) -> tuple[int, float]:
    """Wait for `process` (up to `timeout_s`); (its exit code, the most resident memory, in GiB, that
    any one process it started reached): what to report when the kernel kills one for memory."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    root, peak = psutil.Process(process.pid), 0
    while True:
        try:
            return process.wait(timeout=0.5), peak / 2**30
        except subprocess.TimeoutExpired:
            if deadline is not None and time.monotonic() > deadline:
                raise
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for member in tree:
            try:
                peak = max(peak, member.memory_info().rss)
            except psutil.Error:
                pass


def _killed_message(settings: TrainSettings, peak_gib: float, log: Path) -> str:
    total_gib = psutil.virtual_memory().total / 2**30
    lower = [f"--batch-size (now {settings.batch_size}; --gradient-accumulation keeps the effective batch)"]
    if not settings.gradient_checkpointing:
        lower.append("--gradient-checkpointing (now off)")
    lower.append(f"--max-length (now {settings.max_length})")
    if settings.method == "full":
        lower.append("--method lora (now full)")
    return (
        f"training under {settings.launcher!r} was killed by SIGKILL, most likely by the kernel's "
        f"out-of-memory killer: its largest process reached {peak_gib:.1f} GiB of this machine's "
        f"{total_gib:.1f} GiB. Lower what it needs with {', '.join(lower)}; rerun the same command to "
        f"continue from the last resume point. Log: {log}"
    )


def main(argv: list[str] | None = None) -> None:
    """The entry point a launcher starts in each process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("records", type=Path, help="chat records, one JSON object per line")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--settings", type=Path, help="TrainSettings as JSON")
    args = parser.parse_args(argv)
    settings = TrainSettings(**json.loads(args.settings.read_text())) if args.settings else TrainSettings()
    records = read_records(args.records)
    train_chat(args.model_dir, records, args.output_dir, settings, show_progress=sys.stderr.isatty())
    if KEPT_UNTIL_EXIT:  # everything is written: leave without freeing the process group (see train_chat)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
