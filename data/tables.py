"""The rows of a data file, in the formats people keep such data in.

JSONL is read line by line here (`read_jsonl`), so that an error names its line; JSON (an
array of objects, or JSON lines), CSV, Parquet and a folder written by `save_to_disk` are
read by Hugging Face `datasets`, offline (its packaged readers need no download). A row's
number is its line in a JSONL or CSV file (the CSV header is line 1) and its 1-based
position in the others.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file that cannot be read: names the file, the 1-based line and the field."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = Path(path), line, field, problem
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line, record) for every JSON object of a JSONL file; a bad line names the file and line."""
    if not path.exists():
        raise DataFileError(path, None, None, "file does not exist")
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if b"\0" in raw:
                raise DataFileError(path, number, None, "holds binary data (a NUL byte), not JSON lines")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    path, number, None, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(path, number, None, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataFileError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
            rows.append((number, record))
    if not rows:
        raise DataFileError(path, None, None, "file holds no records")
    return rows


# The readers of `datasets` by file suffix.
READERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = (".jsonl", *READERS, "a folder saved with save_to_disk")


def read_rows(path: Path | str) -> list[tuple[int, dict[str, Any]]]:
    """(row number, record) for every row of a data file; an unreadable file names itself."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, None, None, "file does not exist")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if not path.is_dir() and path.suffix not in READERS:
        raise DataFileError(path, None, None, f"unknown kind of file; readable: {', '.join(FORMATS)}")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never reach for the Hub: these are local files
    import datasets  # noqa: PLC0415 (a heavy import, needed only for these formats)

    kind = "a saved dataset folder" if path.is_dir() else READERS[path.suffix]
    try:
        if path.is_dir():
            rows = datasets.load_from_disk(str(path)).to_list()
        else:  # a cache of its own, gone afterwards: reading a file leaves nothing behind
            with tempfile.TemporaryDirectory(prefix="misstep-datasets-") as cache:
                rows = datasets.load_dataset(
                    kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
                ).to_list()
    except Exception as exc:  # datasets and pyarrow raise many kinds; each is "cannot be read"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataFileError(path, None, None, f"cannot be read as {kind}: {message}") from None
    if isinstance(rows, dict):  # a DatasetDict folder
        raise DataFileError(path, None, None, "holds several splits; point at one split's folder")
    if not rows:
        raise DataFileError(path, None, None, "file holds no records")
    first = 2 if kind == "csv" else 1
    return [(first + i, row) for i, row in enumerate(rows)]
