"""Carry a long run's files between sessions through git, without its weights.

A loop run takes longer than one session, and a session's machine keeps nothing outside the
repository: its weights (hundreds of MB a round) cannot travel, everything else can. `save` copies
a run directory into a committed folder, leaving out weights, optimizer state and the tokenizer
files every checkpoint repeats (each checkpoint keeps its training summary, with its weights'
sha256, its loss log and the records it was trained on); `restore` copies it back. The resumed
run makes a checkpoint's missing weights again only when its model is asked something or trained
on from, and writes `train_replayed.json` beside it saying how and whether they came out the same,
keeping the first training's summary and log as `first_train_*` (lm/provider.py:
LocalProvider.ensure_weights): a LoRA training's adapter travels (a few MB), and is merged back
in seconds; a full fine-tune is trained again on its records. A LoRA training cut short by the
session's end travels with its resume point (the adapter and its optimizer state, tens of MB)
and continues where it stopped; a full fine-tune's (GBs) stays behind.

    .venv/bin/python scripts/carry_run.py save runs/arms carried/arms      # before committing
    .venv/bin/python scripts/carry_run.py restore carried/arms runs/arms   # in a fresh checkout

Both refuse while a process holds the run (its `.lock`): a half-written step would be carried.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
from pathlib import Path

from misstep.data.runfiles import RunDirBusy, RunLock

# What never travels: weights and optimizer state (made again by training), the tokenizer and
# model config every checkpoint copies from the base model, the run's lock.
LEFT_BEHIND = (
    "*.safetensors",
    "*.pt",
    "*.bin",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
    ".lock",
    "*.db-journal",
    "*.db-wal",
)
# A LoRA training's adapter folder, travelling whole: misstep.lm.checkpoint.ADAPTER, written out
# because importing misstep.lm loads torch into what is a file copy.
ADAPTER = "adapter"
RESUME = "resume.pt"
RESUME_CARRIED_BYTES = 64 * 2**20  # a LoRA training's resume point is below this, a full fine-tune's far above


def left_behind(directory: str, names: list[str]) -> set[str]:
    """What `shutil.copytree` leaves out of `directory`: LEFT_BEHIND, except an adapter's files and
    a resume point small enough to commit."""
    if Path(directory).name == ADAPTER:
        return set()
    ignored = shutil.ignore_patterns(*LEFT_BEHIND)(directory, names)
    resume = Path(directory) / RESUME
    if RESUME in ignored and resume.stat().st_size < RESUME_CARRIED_BYTES:
        ignored.discard(RESUME)
    return ignored


def save(run_dir: Path, carried: Path) -> None:
    if carried.exists():
        shutil.rmtree(carried)  # what the run dropped since the last save goes too
    shutil.copytree(run_dir, carried, ignore=left_behind)
    for database in run_dir.rglob("*.db"):  # SQLite's own copy: a whole database, never a torn file
        target = carried / database.relative_to(run_dir)
        with sqlite3.connect(database) as source, sqlite3.connect(target) as copy:
            source.backup(copy)


def restore(carried: Path, run_dir: Path) -> None:
    shutil.copytree(carried, run_dir, dirs_exist_ok=True)  # files here that are not carried stay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source}: no such run directory")
    run_dir = args.source if args.action == "save" else args.target
    try:
        with RunLock(run_dir):  # nobody writes the run while it is copied
            (save if args.action == "save" else restore)(args.source, args.target)
    except RunDirBusy as exc:
        raise SystemExit(str(exc)) from None
    size = sum(p.stat().st_size for p in args.target.rglob("*") if p.is_file())
    print(f"{args.action}d {args.source} -> {args.target} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
