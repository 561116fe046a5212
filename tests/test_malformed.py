"""Malformed model answers pass through every stage without a crash, each one counted.

The fault is injected at the engine: a `dspy.LM` whose engine answers every request with the next
of a list of malformed texts (empty, enormous, every field with a value of the wrong type, other
markers, JSON, control bytes), through `generate`'s real six stages, adapters and summary; and the
tiny random-weight model, whose answers are malformed by nature, through the same path."""

import itertools
import json
import threading
from collections import Counter

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage, response_to_events

from misstep.optimize.jobs import JobSettings, generate
from misstep.signatures import DEFAULT_ERROR_TYPES

FIELDS = (
    "mistake_step",
    "mistake_description",
    "invalid_chain",
    "invalid_answer",
    "has_mistake",
    "first_error_step",
    "recovered_steps",
    "final_answer",
    "recovery_succeeded",
    "confidence",
    "keep",
    "quality",
    "reason",
)
WRONG_VALUES = ("three", "maybe", "-1e309", "[1, 2]", '{"step": 2}', "", "None", "NaN", "9" * 400, "∞")
GARBAGE = (
    "",
    " ",
    "x" * 200_000,  # enormous
    "[[ ## completed ## ]]",
    "[[ ## unknown_field ## ]]\n42\n\n[[ ## completed ## ]]",
    '{"first_error_step": "two", "has_mistake": [true]}',
    "[",
    "\x00\x01\x02\ufffd\ud7ff",
    "[[ ## first_error_step ## ]]\n[[ ## first_error_step ## ]]\n3",
    "<|im_start|>assistant\n<|im_end|>",
    *(
        "\n\n".join(f"[[ ## {name} ## ]]\n{value}" for name in FIELDS) + "\n\n[[ ## completed ## ]]"
        for value in WRONG_VALUES
    ),
)


# One answer that every stage parses, so that the malformed ones reach the later stages too.
WELL_FORMED = (
    "\n\n".join(
        f"[[ ## {name} ## ]]\n{value}"
        for name, value in zip(
            FIELDS,
            ("2", "a slip", "1. 2 + 2 = 5\n2. 5 * 2 = 10", "10", "True", "1", "1. 2 + 2 = 4", "8", "True")
            + ("0.9", "True", "0.8", "clear"),
        )
    )
    + "\n\n[[ ## completed ## ]]"
)


class GarbageEngine:
    """The injected fault: an engine whose every other answer to each stage is malformed, in turn.
    Each stage (told apart by its system prompt) has its own turn: with one turn for all, the
    threads' order decided which stage met the malformed answers, and one stage could meet none."""

    def __init__(self):
        self.turns: dict[str, itertools.cycle] = {}
        self.calls = 0
        self._lock = threading.Lock()

    def complete(self, request) -> Response:
        stage = request.system if isinstance(request.system, str) else str(request.system)
        with self._lock:
            self.calls += 1
            turn = self.turns.setdefault(
                stage, itertools.cycle([x for garbage in GARBAGE for x in (WELL_FORMED, garbage)])
            )
            text = next(turn)
        return Response(
            id=None,
            model="garbage",
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=len(text)),
        )

    def stream(self, request):
        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def _counted(summary: dict, chains: int) -> None:
    """Every stage of every chain is counted once: parsed, unparsable, skipped or another error."""
    for stage, counts in summary["stages"].items():
        assert sum(counts[k] for k in ("parsed", "unparsable", "skipped", "other_errors")) == chains, stage


def test_a_thousand_malformed_answers_pass_every_stage_without_a_crash_each_counted(tmp_path, gsm8k_train):
    engine = GarbageEngine()
    lm = dspy.LM("local/garbage", engine=engine, num_retries=0, cache=False)
    chains = [c for c in gsm8k_train if c.is_valid]
    runs, failed_here = 0, Counter()
    while engine.calls < 1000:
        runs += 1
        run_dir = tmp_path / f"run-{runs}"
        summary = generate(chains, list(DEFAULT_ERROR_TYPES), lm, JobSettings(run_dir=run_dir, num_threads=4))
        _counted(summary, len(chains))
        records = [json.loads(line) for line in (run_dir / "scenarios.jsonl").read_text().splitlines()]
        assert len(records) == len(chains)
        for stage, counts in summary["stages"].items():  # malformed answers reached every stage
            failed_here[stage] += counts["unparsable"] + counts["other_errors"]
    assert engine.calls >= 1000 and len(engine.turns) >= 6  # a turn a stage (the writer's, one an error type)
    assert len(failed_here) == 6 and all(failed_here.values()), failed_here


def test_the_random_weight_model_s_answers_are_counted_in_every_stage(tmp_path, tiny_lm, gsm8k_train):
    chains = [c for c in gsm8k_train if c.is_valid][:6]
    summary = generate(chains, list(DEFAULT_ERROR_TYPES), tiny_lm, JobSettings(run_dir=tmp_path, num_threads=3))
    _counted(summary, len(chains))
