"""Loaders for GSM8K and BIG-Bench Mistake JSONL files, with errors that point at the bad line.

Each loader reads the whole file before returning anything, so a malformed line
fails the load cleanly instead of leaving a half-read data set behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from misstep.data.records import Chain
from misstep.data.tables import DataFileError, read_rows

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
    # Of the chains used, the steps the injector could not read and left alone (where it labels them).
    unreadable_steps: int | None = None

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.example_line.setdefault(reason, line)

    def why_nothing(self) -> str:
        """Why no record was usable, reason by reason, each with an example line."""
        reasons = [f"{n} with {reason} (e.g. line {self.example_line[reason]})" for reason, n in self.skipped.items()]
        return "nothing usable: " + ("; ".join(reasons) if reasons else "no records")

    def to_dict(self) -> dict[str, Any]:
        out = {"loaded": self.loaded, "skipped": dict(self.skipped), "example_line": dict(self.example_line)}
        return out if self.unreadable_steps is None else {**out, "unreadable_steps": self.unreadable_steps}


def line_of(chain: Chain) -> int:
    """The 1-based line of its file a chain came from (its source id ends in ':<line>')."""
    return int(chain.source_id.rsplit(":", 1)[1].split("#")[0])


def sample_path(name: str) -> Path:
    """A sample shipped inside the package, e.g. 'gsm8k/test.jsonl'."""
    path = Path(str(files("misstep.data") / "samples" / name))
    if not path.exists():
        raise FileNotFoundError(f"no shipped sample named {name!r} (looked at {path})")
    return path


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


@dataclass(frozen=True)
class Fields:
    """Which field of a record holds what. By default GSM8K's: `question`, and `answer` with the
    steps one a line and the final answer after '####'. A set whose steps carry a first-error
    label names `steps` (a list, or one text with a step a line) and `label` instead, with the
    label's base (0: the first step is 0; 1: it is 1) and the value that means "no mistake"
    (besides an empty one); `answer`, where the record has it, is then the reference answer."""

    question: str = "question"
    answer: str = "answer"
    steps: str | None = None
    label: str | None = None
    label_base: int = 0
    no_mistake: str | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) != (self.label is None):
            raise ValueError("a labelled set names both its steps field and its label field")
        if self.label_base not in (0, 1):
            raise ValueError(f"label_base must be 0 or 1, not {self.label_base}")

    @property
    def labelled(self) -> bool:
        return self.steps is not None


def load_gsm8k(path: Path | str, report: LoadReport | None = None, fields: Fields = Fields()) -> list[Chain]:
    """GSM8K: the `answer` field is the valid chain, one step a line, final answer after '####'."""
    return gsm8k_chains(Path(path), read_rows(path), report, fields)


def gsm8k_chains(
    path: Path, rows: list[tuple[int, dict[str, Any]]], report: LoadReport | None = None, fields: Fields = Fields()
) -> list[Chain]:
    """Chains from GSM8K-shaped records. A solution without a final answer is skipped and counted
    in `report`; a file where no solution has one is an error that says so, with an example line."""
    report = report if report is not None else LoadReport()
    chains = []
    for line, record in rows:
        question = _field(path, line, record, fields.question, str)
        solution = _field(path, line, record, fields.answer, str)
        body, separator, final = solution.rpartition("####")
        if not separator:
            report.skip(NO_FINAL_ANSWER, line)
            continue
        steps = tuple(step.strip() for step in body.strip().splitlines() if step.strip())
        if not steps:
            raise DataFileError(path, line, fields.answer, "has no reasoning steps before '####'")
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
            fields.answer,
            report.why_nothing() + ": a GSM8K solution ends with '#### <answer>'",
        )
    report.loaded = len(chains)
    return chains


def load_big_bench_mistake(path: Path | str) -> list[Chain]:
    """BIG-Bench Mistake: model-written traces with `mistake_index`, the people-labelled first mistake."""
    return big_bench_mistake_chains(Path(path), read_rows(path))


def big_bench_mistake_chains(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> list[Chain]:
    chains = []
    for line, record in rows:
        question = _field(path, line, record, "input", str)
        steps = _steps(path, line, record, "steps")
        # null where the trace never reached an answer (one logical_deduction trace does this)
        answer = _field(path, line, record, "answer", (str, int, float, type(None)))
        target = _field(path, line, record, "target", (str, int, float))
        mistake = _field(path, line, record, "mistake_index", (int, type(None)))
        if mistake is not None and not 0 <= mistake < len(steps):
            raise DataFileError(path, line, "mistake_index", f"{mistake} is outside the {len(steps)} steps")
        chains.append(
            Chain(
                question=question,
                steps=steps,
                answer=None if answer is None else str(answer),
                reference_answer=str(target),
                source_id=f"{path.parent.name}/{path.name}:{line}",
                task=path.stem,
                mistake_index=mistake,
            )
        )
    return chains


def labelled_chains_of(path: Path, rows: list[tuple[int, dict[str, Any]]], fields: Fields) -> list[Chain]:
    """Chains from a set whose records carry their steps and a first-error label (`fields`)."""
    chains = []
    for line, record in rows:
        question = _field(path, line, record, fields.question, str)
        steps = _steps(path, line, record, fields.steps)
        if fields.label not in record:
            raise DataFileError(path, line, fields.label, "missing")
        label = record[fields.label]
        if label is None or (isinstance(label, str) and not label.strip()) or str(label) == fields.no_mistake:
            mistake = None
        else:
            try:
                mistake = int(str(label).strip()) - fields.label_base
            except ValueError:
                raise DataFileError(path, line, fields.label, f"{label!r} is not a step number") from None
            if isinstance(label, bool) or not 0 <= mistake < len(steps):
                raise DataFileError(
                    path,
                    line,
                    fields.label,
                    f"{label!r} is not one of the {len(steps)} steps (counted from {fields.label_base})",
                )
        answer = record.get(fields.answer)
        chains.append(
            Chain(
                question=question,
                steps=steps,
                answer=None if answer is None else normalize_number(str(answer)),
                reference_answer="" if answer is None else normalize_number(str(answer)),
                source_id=f"{path.parent.name}/{path.name}:{line}",
                task=path.stem,
                mistake_index=mistake,
            )
        )
    return chains


def _steps(path: Path, line: int, record: dict[str, Any], name: str) -> tuple[str, ...]:
    """A record's steps: a list of strings, or one string with a step a line."""
    value = _field(path, line, record, name, (list, str))
    if isinstance(value, str):
        value = [step.strip() for step in value.splitlines() if step.strip()]
    for i, step in enumerate(value):
        if not isinstance(step, str):
            raise DataFileError(path, line, f"{name}[{i}]", f"expected str, got {type(step).__name__}")
    if not value:
        raise DataFileError(path, line, name, "is empty")
    return tuple(value)


def detect_format(path: Path | str) -> str:
    """Which loader fits a file, from the keys of its first record."""
    path = Path(path)
    return _detect(path, read_rows(path))


def _detect(path: Path, rows: list[tuple[int, dict[str, Any]]]) -> str:
    first_line, first = rows[0]
    if {"question", "answer"} <= first.keys():
        return "gsm8k"
    if {"input", "steps", "mistake_index"} <= first.keys():
        return "big-bench-mistake"
    raise DataFileError(
        path,
        first_line,
        None,
        f"unknown format (keys {sorted(first)}): expected GSM8K (question, answer) "
        "or BIG-Bench Mistake (input, steps, answer, target, mistake_index); for other field names "
        "see --question-field, --answer-field, --steps-field and --label-field",
    )


def load_chains(
    path: Path | str, data_format: str | None = None, report: LoadReport | None = None, fields: Fields | None = None
) -> list[Chain]:
    """Load a data file (JSONL, JSON, CSV, Parquet, or a folder saved by `datasets`); its format is
    detected from its first record unless given, or set by `fields` (other field names, or a
    first-error-labelled set). `report` (if given) learns how many records were used and which
    were skipped, and why."""
    path = Path(path)
    rows = read_rows(path)
    if fields is not None and fields != Fields():
        if not fields.labelled:
            return gsm8k_chains(path, rows, report, fields)
        chains = labelled_chains_of(path, rows, fields)
    else:
        data_format = data_format or _detect(path, rows)
        if data_format == "gsm8k":
            return gsm8k_chains(path, rows, report)
        if data_format != "big-bench-mistake":
            raise ValueError(f"unknown data format {data_format!r}; known: gsm8k, big-bench-mistake")
        chains = big_bench_mistake_chains(path, rows)
    if report is not None:
        report.loaded = len(chains)
    return chains
