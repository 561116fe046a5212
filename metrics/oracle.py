"""The ground-truth checker for arithmetic chains: no model, no `eval` of arbitrary text.

Every arithmetic claim in a step is re-evaluated: GSM8K's calculator annotations
`<<48/2=24>>` and the plain `48 / 2 = 24` (or chained `(3 + 4) = 7 = 7`) a model
writes. The first step holding a false claim is the chain's first error. Given the
valid chain it was derived from, a step whose results differ from the valid
chain's results at the same index is an error too, which catches mistakes that
keep the arithmetic right (a wrong operand, a wrong operation, a misread quantity).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass

ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# Characters an arithmetic expression is made of once spaces, '$' and thousands commas go.
_ARITH_CHARS = set("0123456789.,+-*/()%^ $x×÷−–")

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class NotArithmetic(ValueError):
    """The text is not a plain arithmetic expression the oracle can evaluate."""


def _normalize(expression: str, percent: str = "fraction") -> str:
    text = _normalize_for_ops(expression)
    text = text.replace("×", "*").replace("÷", "/").replace("^", "**")
    text = re.sub(r"(?<=[\d)])(\s*)x(\s*)(?=[\d(.])", r"\1*\2", text)  # '3 x 4', never the '3x' of algebra
    text = re.sub(r"(\d+(?:\.\d+)?)%", r"(\1/100)" if percent == "fraction" else r"\1", text)
    text = re.sub(r"(?<![\d.])0+(?=\d)", "", text)  # '01' is a number on paper, not to Python
    return text.strip()


def evaluate(expression: str, percent: str = "fraction") -> float:
    """Evaluate +, -, *, /, //, %, ** over numbers, by walking the syntax tree.

    `percent` reads '20%' as 0.2 ("fraction") or as 20 ("drop"): people write both.
    """
    try:
        tree = ast.parse(_normalize(expression, percent), mode="eval")
    except SyntaxError:
        raise NotArithmetic(expression) from None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise NotArithmetic(expression)  # keep a hostile '9**9**9' from hanging us
            try:
                return _BINARY[type(node.op)](left, right)
            except (ZeroDivisionError, OverflowError):
                return math.nan
        raise NotArithmetic(expression)

    return walk(tree.body)


def has_operator(expression: str) -> bool:
    return bool(re.search(r"(?<=[\d)\s])\s*[-+*/x×÷^]\s*(?=[\d(\s$.-])", _normalize_for_ops(expression)))


def _normalize_for_ops(expression: str) -> str:
    return expression.replace("$", "").replace(",", "").replace("−", "-").replace("–", "-").strip()


def same_number(actual: float, claimed: float, claimed_text: str = "") -> bool:
    """Equal, allowing the rounding a claim's own decimals imply (10/3 = 3.33)."""
    if math.isnan(actual) or math.isnan(claimed):
        return False
    decimals = len(claimed_text.split(".")[1]) if "." in claimed_text else 0
    tolerance = 0.5 * 10**-decimals if claimed_text else 0.0
    return abs(actual - claimed) <= max(tolerance, 1e-9 * max(1.0, abs(claimed)))


@dataclass(frozen=True)
class Claim:
    """One checked equality: `expression` should equal `claimed` (the text after '=')."""

    expression: str
    claimed_text: str
    actual: float
    claimed: float
    # Where a '%' makes two readings possible ('12/20 x 100% = 60%', '18/450 x 100 = 4%'),
    # the (actual, claimed) pair of the other reading; the claim holds if either does.
    other_reading: tuple[float, float] | None = None

    @property
    def ok(self) -> bool:
        literal = _claimed_literal(self.claimed_text)
        readings = [(self.actual, self.claimed)] + ([self.other_reading] if self.other_reading else [])
        return any(same_number(actual, claimed, literal) for actual, claimed in readings)


def _claimed_literal(text: str) -> str:
    text = _normalize_for_ops(text)
    return text if NUMBER.fullmatch(text) else ""


def arith_suffix(text: str) -> str:
    i = len(text)
    while i > 0 and text[i - 1] in _ARITH_CHARS:
        i -= 1
    return text[i:]


def arith_prefix(text: str) -> str:
    i = 0
    while i < len(text) and text[i] in _ARITH_CHARS:
        i += 1
    return text[:i]


# Punctuation before an expression ends the sentence before it; '.25' is a number, not a full stop.
LEADING_PUNCTUATION = re.compile(r"^(?:[\s,;:]|\.(?!\d))+")


def cut_or_empty(expression: str) -> bool:
    """Whether `expression` holds no number, or starts with a binary operator: a run cut by a word
    ('9 hours * 2/3'), where guessing which part was meant invents claims nobody made."""
    return not re.search(r"\d", expression) or bool(re.match(r"([+*/x×÷^]|[-−–]\s)", expression))


def _whole_expression(candidate: str, *, at_start: bool) -> tuple[str, float] | None:
    """`candidate` as one arithmetic expression, or None: only the whole run counts."""
    if at_start:
        expression = LEADING_PUNCTUATION.sub("", candidate).strip()
    else:
        expression = re.sub(r"[\s,.;:]*$", "", candidate).strip()
    if cut_or_empty(expression):
        return None
    try:
        return expression, evaluate(expression)
    except NotArithmetic:
        return None


def plain_claims(text: str) -> list[Claim]:
    """Claims written as `expr = value`, including chains `a = b = c` (each '=' is one claim)."""
    segments = text.split("=")
    claims = []
    for left_text, right_text in zip(segments, segments[1:]):
        right_run = arith_prefix(right_text.lstrip())
        if re.search(r"\d$", right_run) and re.match(r"[A-Za-z]", right_text.lstrip()[len(right_run) :]):
            continue  # '240g/5': a unit glued to the number means the run goes on past it
        left = _whole_expression(arith_suffix(left_text), at_start=True)
        right = _whole_expression(right_run, at_start=False)
        if left is None or right is None:
            continue
        if not (has_operator(left[0]) or has_operator(right[0])):
            continue  # '5 = 5' states nothing to check
        other = None
        if "%" in left[0] + right[0]:
            other = (evaluate(left[0], percent="drop"), evaluate(right[0], percent="drop"))
        claims.append(Claim(left[0], right[0], left[1], right[1], other))
    return claims


def annotation_claims(step: str) -> list[Claim]:
    """GSM8K calculator annotations `<<expr=value>>`."""
    claims = []
    for expression, claimed_text in ANNOTATION.findall(step):
        try:
            claims.append(Claim(expression, claimed_text, evaluate(expression), evaluate(claimed_text)))
        except NotArithmetic:
            claims.append(Claim(expression, claimed_text, math.nan, math.nan))
    return claims


def claims_in_step(step: str) -> list[Claim]:
    """Every arithmetic claim in one step. Where a step has calculator annotations they are
    its claims (GSM8K's prose around them is loose: '60 students x 2/3 = 40'); otherwise
    the plain `expr = value` text is checked."""
    return annotation_claims(step) or plain_claims(step)


def step_results(step: str) -> list[float]:
    """The values a step claims to compute (its annotations' results, else its plain claims')."""
    claims = annotation_claims(step) or plain_claims(step)
    return [claim.claimed for claim in claims]


def first_error(steps: tuple[str, ...] | list[str], reference: tuple[str, ...] | list[str] | None = None) -> int | None:
    """0-based index of the first step with a false claim or, given the valid chain it came
    from, a result the valid chain never computes; None if there is none.

    Comparing with all of the valid chain's results, not just the same index, keeps a
    chain that skips a step right up to the step that needed the skipped value. Where
    both chains have the same number of steps they are aligned, and a result that
    differs at the same index is an error even if it happens to appear elsewhere.
    """
    aligned = reference is not None and len(reference) == len(steps)
    valid_results = [value for step in reference for value in step_results(step)] if reference is not None else []
    for index, step in enumerate(steps):
        if any(not claim.ok for claim in claims_in_step(step)):
            return index
        if reference is not None and any(
            not any(same_number(value, known) for known in valid_results) for value in step_results(step)
        ):
            return index
        if aligned and not _same_values(step_results(step), step_results(reference[index])):
            return index
    return None


def _same_values(mine: list[float], theirs: list[float]) -> bool:
    return len(mine) == len(theirs) and all(map(same_number, sorted(mine), sorted(theirs)))


def final_number(text: str) -> float | None:
    """The last number in a piece of text ('The answer is $1,234.' -> 1234.0)."""
    numbers = NUMBER.findall(text.replace("$", ""))
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def answers_match(answer: str | None, reference: str) -> bool:
    """Numeric answers compare as numbers; anything else as normalized text (BIG-Bench tasks)."""
    if answer is None:
        return False
    expected = (
        final_number(reference) if NUMBER.fullmatch(reference.replace(",", "").replace("$", "").strip()) else None
    )
    if expected is not None:
        got = final_number(answer)
        return got is not None and same_number(got, expected)
    got, want = _normalize_text(answer), _normalize_text(reference)
    return bool(want) and (got == want or got.endswith(" " + want))


def _normalize_text(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())
