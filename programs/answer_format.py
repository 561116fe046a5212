"""Each stage's answer as a grammar, so that constrained decoding makes every answer parse.

ChatAdapter answers one field after another, each under its marker, and ends with a closing one:

    [[ ## has_mistake ## ]]
    True

    [[ ## first_error_step ## ]]
    3

    [[ ## completed ## ]]

`answer_format(signature, inputs)` turns a signature's output fields into that shape as an EBNF
grammar (the dialect of xgrammar, which vLLM's structured outputs also read), each value by its
type: a bool, a `Literal`'s choices, an int (a `StepNumber` within the steps of the chain it
names, or the "no step" value), a float (in [0, 1] where its `Interval` says so), free text that
cannot contain a field marker. Beside the grammar, the answer's `closing`: what must follow each
field, so that an engine can close an answer in time when its token budget runs out.

`AnswerAdapter` is ChatAdapter (same prompts, same parsing, same training data) that sends this
constraint with every call; `constrained=False` sends none.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import dspy
from annotated_types import Interval

from misstep.data.records import step_count
from misstep.signatures.fields import StepNumber

END = "[[ ## completed ## ]]"
# Free text may hold any character but cannot open a marker: no "[[" (a lone "[" is fine).
TEXT_RULE = 'text ::= ([^\\[] | "[" [^\\[])* "["?'
INT_DIGITS = 9  # an int without a declared range: at most this many digits
FLOAT_DECIMALS = 3
MOST_ENUMERATED = 200  # a declared int range wider than this has no grammar here


class GrammarError(TypeError):
    """An output field whose type no answer grammar can express."""


@dataclass(frozen=True)
class FieldClosing:
    """One output field, for closing an answer in time: its marker, what follows its value (the next
    marker, or the closing one), whether its value is free text (which may be cut short, to nothing)
    and otherwise the most characters its value can take."""

    marker: str
    after: str
    free: bool
    most_chars: int


@dataclass(frozen=True)
class AnswerFormat:
    grammar: str  # EBNF, root rule `root`
    closing: tuple[FieldClosing, ...]

    def payload(self) -> dict[str, Any]:
        """The constraint as a request carries it: vLLM's `structured_outputs` and the closing plan."""
        return {
            "structured_outputs": {"grammar": self.grammar},
            "closing": [[f.marker, f.after, f.free, f.most_chars] for f in self.closing],
        }


def marker(name: str) -> str:
    return f"[[ ## {name} ## ]]"


def answer_format(signature: type[dspy.Signature], inputs: dict[str, Any]) -> AnswerFormat:
    """The grammar of `signature`'s answer to `inputs` (only a `StepNumber`'s range depends on them)."""
    steps = tuple(
        (name, _step_count(signature, name, step.of, inputs)) for name, step in _step_numbers(signature).items()
    )
    return _answer_format(signature, steps)


def _step_numbers(signature: type[dspy.Signature]) -> dict[str, StepNumber]:
    return {
        name: step
        for name, field in signature.output_fields.items()
        for step in field.metadata
        if isinstance(step, StepNumber)
    }


def _step_count(signature: type[dspy.Signature], name: str, of: str, inputs: dict[str, Any]) -> int:
    if of not in signature.input_fields:
        raise GrammarError(f"{signature.__name__}.{name}: StepNumber({of!r}) names no input field of the signature")
    if of not in inputs:
        raise GrammarError(f"{signature.__name__}.{name}: its range needs the input {of!r}, which this call lacks")
    return step_count(str(inputs[of]))


@lru_cache(maxsize=256)
def _answer_format(signature: type[dspy.Signature], steps: tuple[tuple[str, int], ...]) -> AnswerFormat:
    counts = dict(steps)
    names = list(signature.output_fields)
    values, closing = [], []
    for index, name in enumerate(names):
        field = signature.output_fields[name]
        value, most = _value_rule(signature, name, field, counts.get(name))
        after = "\n\n" + (marker(names[index + 1]) + "\n" if index + 1 < len(names) else END)
        opening = _literal(marker(name) + "\n")
        values.append(f"{opening} {value}")
        closing.append(FieldClosing(marker(name), after, most is None, most or 0))
    separator, end = _literal("\n\n"), _literal("\n\n" + END)
    rules = [f"root ::= {f' {separator} '.join(values)} {end}"]
    if any(c.free for c in closing):
        rules.append(TEXT_RULE)
    return AnswerFormat("\n".join(rules), tuple(closing))


def _value_rule(signature, name: str, field, steps: int | None) -> tuple[str, int | None]:
    """The rule of one field's value, and the most characters it can take (None: free text)."""
    annotation = field.annotation
    where = f"{signature.__name__}.{name}"
    if annotation is str:
        return "text", None
    if annotation is bool:
        return _choices(["True", "False"])
    if typing.get_origin(annotation) is Literal:
        return _choices([str(choice) for choice in typing.get_args(annotation)])
    interval = next((m for m in field.metadata if isinstance(m, Interval)), Interval())
    if annotation is int:
        if steps is not None:
            none = next(m.none for m in field.metadata if isinstance(m, StepNumber))
            numbers = ([none] if none is not None else []) + list(range(1, max(steps, 1) + 1))
            return _choices([str(n) for n in dict.fromkeys(numbers)])
        return _int_rule(where, interval)
    if annotation is float:
        return _float_rule(where, interval)
    plain = typing.get_origin(annotation) is None and not isinstance(annotation, types.UnionType)
    shown = getattr(annotation, "__name__", annotation) if plain else annotation  # int, or list[str]
    raise GrammarError(f"{where}: no answer grammar for type {shown}; run it unconstrained")


def _choices(choices: list[str]) -> tuple[str, int]:
    return "(" + " | ".join(_literal(c) for c in choices) + ")", max(len(c) for c in choices)


def _int_rule(where: str, interval: Interval) -> tuple[str, int]:
    low = interval.ge if interval.ge is not None else (interval.gt + 1 if interval.gt is not None else None)
    high = interval.le if interval.le is not None else (interval.lt - 1 if interval.lt is not None else None)
    if low is None and high is None:
        return f'"-"? [0-9]{{1,{INT_DIGITS}}}', INT_DIGITS + 1
    if low is not None and high is not None and high - low < MOST_ENUMERATED:
        return _choices([str(n) for n in range(low, high + 1)])
    if low is not None and low >= 0 and high is None:
        return f"[0-9]{{1,{INT_DIGITS}}}", INT_DIGITS
    raise GrammarError(f"{where}: no answer grammar for an int in {interval}; run it unconstrained")


def _float_rule(where: str, interval: Interval) -> tuple[str, int]:
    decimals = f'("." [0-9]{{1,{FLOAT_DECIMALS}}})?'
    if interval == Interval(ge=0, le=1):
        return f'("0" {decimals} | "1" ("." "0"{{1,{FLOAT_DECIMALS}}})?)', 2 + FLOAT_DECIMALS
    if interval == Interval():
        return f'"-"? [0-9]{{1,{INT_DIGITS}}} {decimals}', 2 + INT_DIGITS + FLOAT_DECIMALS
    if interval == Interval(ge=0):
        return f"[0-9]{{1,{INT_DIGITS}}} {decimals}", 1 + INT_DIGITS + FLOAT_DECIMALS
    raise GrammarError(f"{where}: no answer grammar for a float in {interval}; run it unconstrained")


def _literal(text: str) -> str:
    """`text` as an EBNF string literal (JSON's escapes are the grammar's)."""
    return json.dumps(text, ensure_ascii=False)


def constraint_kwargs(lm: dspy.LM, answer: AnswerFormat) -> dict[str, Any]:
    """How `lm` takes the constraint: a vLLM server in the request body's `structured_outputs`, and
    the whole payload for the logits processor every misstep server loads (lm/vllm_answer.py) in
    `vllm_xargs` (LiteLLM passes `extra_body` on); the embedded engine in the request's metadata,
    which DSPy carries to it unchanged."""
    payload = answer.payload()
    if lm.model.startswith("hosted_vllm/"):
        xargs = {"misstep_answer": json.dumps(payload)}  # vllm_xargs values are strings or numbers
        return {"extra_body": {"structured_outputs": payload["structured_outputs"], "vllm_xargs": xargs}}
    if lm.model.startswith("local/"):
        return {"metadata": payload}
    raise ValueError(f"{lm.model}: constrained decoding needs the embedded engine or a vLLM server; run unconstrained")


class AnswerAdapter(dspy.ChatAdapter):
    """ChatAdapter whose calls are constrained to the signature's answer format (`constrained=False`:
    ChatAdapter itself). Without ChatAdapter's JSON-mode retry: a local engine ignores
    `response_format`, so the retry would only spend a second call on the same answer."""

    def __init__(self, constrained: bool = True, **kwargs):
        super().__init__(use_json_adapter_fallback=False, **kwargs)
        self.constrained = constrained

    def _constrained_kwargs(self, lm, lm_kwargs: dict[str, Any], signature, inputs) -> dict[str, Any]:
        if not self.constrained:
            return lm_kwargs
        return {**lm_kwargs, **constraint_kwargs(lm, answer_format(signature, inputs))}

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        return super().__call__(
            lm, self._constrained_kwargs(lm, lm_kwargs, signature, inputs), signature, demos, inputs
        )

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        kwargs = self._constrained_kwargs(lm, lm_kwargs, signature, inputs)
        return await super().acall(lm, kwargs, signature, demos, inputs)
