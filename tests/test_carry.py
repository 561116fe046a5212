"""scripts/carry_run.py: a run's files travel through git without its weights, and come back."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from misstep.data.runfiles import RunLock

SCRIPT = Path(__file__).parents[1] / "scripts" / "carry_run.py"


def carry(*args: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_a_run_is_carried_without_its_weights_and_restored_beside_what_is_there(tmp_path):
    run = tmp_path / "runs" / "arms"
    checkpoint = run / "checkpoints" / "abc123"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 1024)
    (checkpoint / "resume.pt").write_bytes(b"\0" * 64)
    (checkpoint / "tokenizer.json").write_text("{}")
    (checkpoint / "train_summary.json").write_text('{"weights": {"model.safetensors": {"sha256": "00"}}}')
    (checkpoint / "train_log.jsonl").write_text('{"step": 1}\n')
    lora = run / "checkpoints" / "lora456"  # a LoRA training: its adapter travels; one cut short, its resume point
    (lora / "adapter").mkdir(parents=True)
    (lora / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 256)
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    (lora / "model.safetensors").write_bytes(b"\0" * 1024)
    cut = run / "checkpoints" / "lora789"
    cut.mkdir()
    (cut / "resume.pt").write_bytes(b"\0" * 128)
    with (checkpoint / "resume.pt").open("r+b") as handle:  # a full fine-tune's: too large to commit (sparse here)
        handle.truncate(65 * 2**20)
    (run / "round-1").mkdir()
    (run / "round-1" / "scenarios.jsonl").write_text('{"key": "a"}\n')
    with sqlite3.connect(run / "optuna.db") as db:
        db.execute("create table trials (value real)")
        db.execute("insert into trials values (0.5)")

    carried = tmp_path / "carried" / "arms"
    with RunLock(run):  # a process still writes the run: nothing is carried half-written
        refused = carry("save", run, carried)
    assert refused.returncode != 0 and "in use" in refused.stderr and not carried.exists()

    assert carry("save", run, carried).returncode == 0
    kept = {p.relative_to(carried).as_posix() for p in carried.rglob("*") if p.is_file()}
    assert kept == {
        "checkpoints/abc123/train_summary.json",
        "checkpoints/abc123/train_log.jsonl",
        "checkpoints/lora456/adapter/adapter_model.safetensors",
        "checkpoints/lora456/adapter/adapter_config.json",
        "checkpoints/lora789/resume.pt",
        "round-1/scenarios.jsonl",
        "optuna.db",
    }
    with sqlite3.connect(carried / "optuna.db") as db:
        assert db.execute("select value from trials").fetchall() == [(0.5,)]

    fresh = tmp_path / "fresh" / "arms"  # a new checkout: the run comes back, its weights do not
    assert carry("restore", carried, fresh).returncode == 0
    assert (fresh / "round-1" / "scenarios.jsonl").read_text() == '{"key": "a"}\n'
    assert not (fresh / "checkpoints" / "abc123" / "model.safetensors").exists()
    assert carry("save", tmp_path / "nothing", carried).returncode != 0  # no such run: said, nothing lost
    assert (carried / "optuna.db").exists()
