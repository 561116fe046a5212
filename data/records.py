"""The one record type for a chain of reasoning, and the scenario record the stages fill.

A `Chain` flows through every layer unchanged; the six stages add their outputs to a
`Scenario` rather than passing loose tuples around.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Chain:
    """A question and a chain of reasoning steps that ends in an answer.

    `answer` is what this chain concludes (None if it never gets there);
    `reference_answer` is the correct answer to the question (they differ when the
    chain is wrong). `mistake_index` is the
    0-based step of the first error, or None when the chain has no mistake: a
    ground-truth label set by people (BIG-Bench Mistake), by construction (GSM8K's
    reference solutions) or by the deterministic injector.
    """

    question: str
    steps: tuple[str, ...]
    answer: str | None
    reference_answer: str
    source_id: str
    task: str
    mistake_index: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))

    @property
    def is_valid(self) -> bool:
        return self.mistake_index is None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["steps"] = list(self.steps)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Chain:
        return cls(**{**record, "steps": tuple(record["steps"])})


def format_steps(steps: tuple[str, ...] | list[str]) -> str:
    """Steps as the models see them: one numbered line each, counted from 1."""
    return "\n".join(f"Step {i}: {step}" for i, step in enumerate(steps, start=1))


_NUMBERED = re.compile(r"^Step (\d+): ", re.MULTILINE)


def step_count(text: str) -> int:
    """How many steps a chain shown by `format_steps` has: its last step's number (a step's own text
    may be empty, or hold a line break); for other text, the lines `parse_steps` reads as steps."""
    numbers = [int(n) for n in _NUMBERED.findall(text)]
    return max(numbers) if numbers else len(parse_steps(text))


_STEP_PREFIX = re.compile(r"^\s*(?:[-*]\s*)?(?:step\s*\d+\s*[:.)]|\d+\s*[.)])\s*", re.IGNORECASE)


def parse_steps(text: str) -> tuple[str, ...]:
    """Inverse of `format_steps`, lenient about how a model numbers its lines."""
    steps = []
    for line in text.splitlines():
        line = _STEP_PREFIX.sub("", line).strip()
        if line:
            steps.append(line)
    return tuple(steps)


@dataclass
class StageResult:
    """What one stage produced: its parsed outputs, or the raw text it failed to parse."""

    ok: bool
    outputs: dict[str, Any] = field(default_factory=dict)
    raw: str | None = None
    error: str | None = None

    @classmethod
    def skipped(cls, reason: str) -> StageResult:
        return cls(ok=False, error=f"skipped: {reason}")


STAGES = ("describe", "corrupt", "locate", "recover", "judge", "curate")


@dataclass
class Scenario:
    """One pass of the six-stage cycle over a valid chain.

    `stages` holds each stage's result by name (see STAGES); `invalid_steps` and
    `recovered_steps` are the chains the model wrote; `oracle` holds ground-truth
    checks that no model wrote (filled by misstep.metrics where a checker applies).
    `candidate` 0 is the cycle's own pass; 1, 2, ... are stages 3-6 sampled again on the same
    written chain (the loop's candidates), each a record of its own, with how the student sampled
    them in `sampling` (temperature, seed).
    """

    chain: Chain
    error_type: str
    stages: dict[str, StageResult] = field(default_factory=dict)
    invalid_steps: tuple[str, ...] = ()
    recovered_steps: tuple[str, ...] = ()
    oracle: dict[str, Any] = field(default_factory=dict)
    candidate: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The record's own id: its chain's, and which candidate it is."""
        return self.chain.source_id if not self.candidate else f"{self.chain.source_id}#{self.candidate}"

    def output(self, stage: str, name: str, default: Any = None) -> Any:
        result = self.stages.get(stage)
        return result.outputs.get(name, default) if result and result.ok else default

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_id": self.chain.source_id,
            "error_type": self.error_type,
            "chain": self.chain.to_dict(),
            "stages": {name: asdict(result) for name, result in self.stages.items()},
            "invalid_steps": list(self.invalid_steps),
            "recovered_steps": list(self.recovered_steps),
            "oracle": self.oracle,
            "candidate": self.candidate,
            "sampling": self.sampling,
        }

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Scenario:
        return cls(
            chain=Chain.from_dict(record["chain"]),
            error_type=record["error_type"],
            stages={name: StageResult(**result) for name, result in record["stages"].items()},
            invalid_steps=tuple(record["invalid_steps"]),
            recovered_steps=tuple(record["recovered_steps"]),
            oracle=record.get("oracle", {}),
            candidate=record.get("candidate", 0),
            sampling=record.get("sampling", {}),
        )
