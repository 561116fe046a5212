"""Loaders for GSM8K and BIG-Bench Mistake JSONL files, with errors that point at the bad line.

Each loader reads the whole file before returning anything, so a malformed line
fails the load cleanly instead of leaving a half-read data set behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from misstep.data.records import Chain


class DataFileError(ValueError):
    """A data file that cannot be read: names the file, the 1-based line and the field."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = Path(path), line, field, problem
        where = f"{path}:{line}" if line is not None else str(path)
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")


# Why a record of a data file could not be used (the keys of a LoadReport's "skipped").
NO_FINAL_ANSWER = "no final answer"
NO_CHECKABLE_STEP = "no checkable step"
ORACLE_FINDS_WRONG = "a solution the oracle finds wrong"


@dataclass
class LoadReport:
    """What one data file gave: how many records were used, how many were skipped and why, and
    for each reason the first line it happened on."""

    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    example_line: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.example_line.setdefault(reason, line)

    def why_nothing(self) -> str:
        """Why no record was usable, reason by reason, each with an example line."""
        reasons = [f"{n} with {reason} (e.g. line {self.example_line[reason]})" for reason, n in self.skipped.items()]
        return "nothing usable: " + ("; ".join(reasons) if reasons else "no records")

    def to_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "skipped": dict(self.skipped), "example_line": dict(self.example_line)}


def line_of(chain: Chain) -> int:
    """The 1-based line of its file a chain came from (its source id ends in ':<line>')."""
    return int(chain.source_id.rsplit(":", 1)[1].split("#")[0])


def sample_path(name: str) -> Path:
    """A sample shipped inside the package, e.g. 'gsm8k/test.jsonl'."""
    path = Path(str(files("misstep.data") / "samples" / name))
    if not path.exists():
        raise FileNotFoundError(f"no shipped sample named {name!r} (looked at {path})")
    return path


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


def _field(path: Path, line: int, record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        raise DataFileError(path, line, name, "missing")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int to Python, but `true` is never a step index or a count.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise DataFileError(path, line, name, f"expected {expected}, got {type(value).__name__}")
    return value


def normalize_number(text: str) -> str:
    """'1,000' -> '1000', '$18' -> '18': how GSM8K writes final answers."""
    return text.replace(",", "").replace("$", "").strip()


def load_gsm8k(path: Path | str, report: LoadReport | None = None) -> list[Chain]:
    """GSM8K: the `answer` field is the valid chain, one step a line, final answer after '####'.

    A solution without a final answer is skipped and counted in `report`; a file where no
    solution has one is an error that says so, with an example line."""
    path = Path(path)
    report = report if report is not None else LoadReport()
    chains = []
    for line, record in read_jsonl(path):
        question = _field(path, line, record, "question", str)
        solution = _field(path, line, record, "answer", str)
        body, separator, final = solution.rpartition("####")
        if not separator:
            report.skip(NO_FINAL_ANSWER, line)
            continue
        steps = tuple(step.strip() for step in body.strip().splitlines() if step.strip())
        if not steps:
            raise DataFileError(path, line, "answer", "has no reasoning steps before '####'")
        answer = normalize_number(final)
        chains.append(
            Chain(
                question=question,
                steps=steps,
                answer=answer,
                reference_answer=answer,
                source_id=f"{path.parent.name}/{path.name}:{line}",
                task="gsm8k",
                mistake_index=None,
            )
        )
    if not chains:
        raise DataFileError(
            path,
            report.example_line.get(NO_FINAL_ANSWER),
            "answer",
            report.why_nothing() + ": a GSM8K solution ends with '#### <answer>'",
        )
    report.loaded = len(chains)
    return chains


def load_big_bench_mistake(path: Path | str) -> list[Chain]:
    """BIG-Bench Mistake: model-written traces with `mistake_index`, the people-labelled first mistake."""
    path = Path(path)
    chains = []
    for line, record in read_jsonl(path):
        question = _field(path, line, record, "input", str)
        steps = _field(path, line, record, "steps", list)
        for i, step in enumerate(steps):
            if not isinstance(step, str):
                raise DataFileError(path, line, f"steps[{i}]", f"expected str, got {type(step).__name__}")
        if not steps:
            raise DataFileError(path, line, "steps", "is empty")
        # null where the trace never reached an answer (one logical_deduction trace does this)
        answer = _field(path, line, record, "answer", (str, int, float, type(None)))
        target = _field(path, line, record, "target", (str, int, float))
        mistake = _field(path, line, record, "mistake_index", (int, type(None)))
        if mistake is not None and not 0 <= mistake < len(steps):
            raise DataFileError(path, line, "mistake_index", f"{mistake} is outside the {len(steps)} steps")
        chains.append(
            Chain(
                question=question,
                steps=tuple(steps),
                answer=None if answer is None else str(answer),
                reference_answer=str(target),
                source_id=f"{path.parent.name}/{path.name}:{line}",
                task=path.stem,
                mistake_index=mistake,
            )
        )
    return chains


LOADERS: dict[str, Callable[[Path], list[Chain]]] = {
    "gsm8k": load_gsm8k,
    "big-bench-mistake": load_big_bench_mistake,
}


def detect_format(path: Path | str) -> str:
    """Which loader fits a file, from the keys of its first record."""
    path = Path(path)
    first_line, first = read_jsonl(path)[0]
    if {"question", "answer"} <= first.keys():
        return "gsm8k"
    if {"input", "steps", "mistake_index"} <= first.keys():
        return "big-bench-mistake"
    raise DataFileError(
        path,
        first_line,
        None,
        f"unknown format (keys {sorted(first)}): expected GSM8K (question, answer) "
        "or BIG-Bench Mistake (input, steps, answer, target, mistake_index)",
    )


def load_chains(path: Path | str, data_format: str | None = None, report: LoadReport | None = None) -> list[Chain]:
    """Load any supported file; the format is detected unless given. `report` (if given) learns
    how many records were used and which were skipped, and why."""
    data_format = data_format or detect_format(path)
    if data_format not in LOADERS:
        raise ValueError(f"unknown data format {data_format!r}; known: {', '.join(LOADERS)}")
    if data_format == "gsm8k":
        return load_gsm8k(Path(path), report)
    chains = LOADERS[data_format](Path(path))
    if report is not None:
        report.loaded = len(chains)
    return chains
