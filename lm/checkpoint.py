"""Whether a checkpoint folder is whole: a training's `train_summary.json` is written last and
records each weights file's size and sha256, so a folder is finished only if the summary is there
and every file still matches it. A folder cut short (a full disk, a kill while saving, a copy
that stopped) is trained again, never loaded half.

Summaries written before sizes and digests were recorded are checked by the safetensors format
itself: the header states where every tensor's bytes end, so a cut file is seen by its length.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

SUMMARY = "train_summary.json"
TRAIN_LOG = "train_log.jsonl"  # one line a step: loss, learning rate, tokens, seconds
ADAPTER = "adapter"  # a LoRA training's adapter, beside the merged weights (peft's folder)


def weights_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_record(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"bytes", "sha256"}} for each weights file: what the summary keeps."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in weights_files(folder)}


def recorded_digests(folder: Path) -> dict[str, str] | None:
    """{weights file: sha256} as the folder's training summary records them; None where it has no
    summary, or one from before digests were kept."""
    try:
        summary = json.loads((Path(folder) / SUMMARY).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    weights = summary.get("weights")
    return {name: entry["sha256"] for name, entry in weights.items()} if weights else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a whole checkpoint, or None if it is."""
    folder = Path(folder)
    summary_path = folder / SUMMARY
    if not summary_path.exists():
        return f"{folder}: no {SUMMARY} (its training did not finish)"
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{summary_path}: not whole JSON (cut short)"
    recorded = summary.get("weights")
    if recorded is None:  # an older summary: the format's own lengths are all there is to check
        files = weights_files(folder)
        if not files:
            return f"{folder}: no weights file"
        for path in files:
            problem = _safetensors_length_problem(path)
            if problem:
                return problem
        return None
    return _files_problem(folder, recorded)


def adapter_problem(folder: Path) -> str | None:
    """Why `folder`'s LoRA adapter cannot make its weights again, or None if it can: the summary
    records one and every file of it is there as recorded."""
    folder = Path(folder)
    try:
        recorded = json.loads((folder / SUMMARY).read_text(encoding="utf-8")).get("adapter")
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{folder}: no whole {SUMMARY}"
    if not recorded:
        return f"{folder / SUMMARY}: records no adapter (not a LoRA training)"
    return _files_problem(folder / ADAPTER, recorded)


def _files_problem(folder: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """Why the files under `folder` are not the ones `recorded` ({name: {"bytes", "sha256"}}), or None."""
    for name, expected in recorded.items():
        path = folder / name
        if not path.exists():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, the summary records {expected['bytes']} (cut short)"
        if sha256_of(path) != expected["sha256"]:
            return f"{path}: its sha256 differs from the one the summary records"
    return None


def _safetensors_length_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a safetensors header"
        (header_length,) = struct.unpack("<Q", head)
        if 8 + header_length > size:
            return f"{path}: its header runs past the end of the file (cut short)"
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path}: its header is not whole"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_length + end != size:
        return f"{path}: {size} bytes, its header needs {8 + header_length + end} (cut short)"
    return None
