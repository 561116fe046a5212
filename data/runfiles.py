"""Run-directory files that survive a kill: atomic JSON, and JSONL that is appended record by record."""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    _write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    """A whole JSONL file at once (a step's finished output), never seen half-written."""
    _write_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


def read_records(path: Path) -> list[dict[str, Any]]:
    """A run's JSONL file as records ([] where the step that writes it has not run yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class JsonlLog:
    """An append-only JSONL file of finished records, for runs that resume.

    Each record is one line, flushed as it is written. On reopening, a last line cut
    short by a kill is dropped from the file, so only whole records are ever read back.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = list(self._read_whole_records())
        self._out = path.open("a", encoding="utf-8")

    def _read_whole_records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        good_bytes = 0
        with self.path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # the torn tail of a killed run; everything before it is whole
                if not line.endswith(b"\n"):
                    break
                good_bytes += len(line)
                yield record
        if good_bytes < self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)

    def append(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps(record, default=str) + "\n")
        self._out.flush()
        self.records.append(record)

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunDirBusy(RuntimeError):
    """Another live process owns the run directory."""


class RunLock:
    """One process at a time writes a run directory: an exclusive `flock` on RUN_DIR/.lock, which
    names the holder's process id. The kernel drops the lock when its holder exits, however it
    dies (kill -9 included), so a killed run never leaves a stuck lock behind. Within the process
    that holds it the lock may be taken again (a command, then the loop it runs).

        with RunLock(run_dir):
            ...  # write there
    """

    _held: dict[Path, list] = {}  # resolved lock path -> [open handle, depth], for this process
    _guard = threading.Lock()

    def __init__(self, run_dir: Path):
        self.path = (Path(run_dir) / ".lock").resolve()

    def acquire(self) -> RunLock:
        with RunLock._guard:
            if self.path in RunLock._held:
                RunLock._held[self.path][1] += 1
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunDirBusy(
                    f"{self.path.parent} is in use by process {holder}: wait for it to finish, or stop it, "
                    "before running another command that writes there"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            RunLock._held[self.path] = [handle, 1]
            return self

    def release(self) -> None:
        with RunLock._guard:
            held = RunLock._held.get(self.path)
            if held is None:
                return
            held[1] -= 1
            if held[1] == 0:
                del RunLock._held[self.path]
                fcntl.flock(held[0], fcntl.LOCK_UN)
                held[0].close()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run_dir(run_dir_of: Callable[[dict[str, Any]], Path]):
    """Decorate a function that writes a run directory so it holds `RunLock` on it while it runs.
    `run_dir_of` picks the folder from the call's arguments, by name:

        @holds_run_dir(lambda args: args["settings"].run_dir)
        def generate(chains, error_types, lm, settings): ...
    """

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with RunLock(run_dir_of(bound.arguments)):
                return function(*args, **kwargs)

        return locked

    return decorate


def saved_or_made(path: Path, make: Callable[[], Any]) -> Any:
    """A step's saved output, or `make()`'s, saved atomically now: a rerun never redoes a finished
    step, and a half-written file is never read."""
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    value = make()
    write_json_atomic(path, value)
    return value


def saved_or_made_jsonl(path: Path, make: Callable[[], list[dict]]) -> list[dict]:
    """`saved_or_made` for a list of records, one a line."""
    if path.exists():
        return read_records(path)
    records = make()
    write_jsonl_atomic(path, records)
    return records


@contextmanager
def timed(seconds: dict[str, float], step: str):
    """Add the wall time of the block to `seconds[step]` (a run's evidence of where its time went)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started
