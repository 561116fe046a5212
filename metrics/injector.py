"""A deterministic error injector: corrupts a valid GSM8K chain at a chosen step, with a
chosen error type, and carries the wrong value through every later step.

Steps are read one of two ways, per chain: where any step carries GSM8K's calculator
annotation (`<<48/2=24>>`), the annotations are the steps' arithmetic; in a chain without
any, a step's plain `expr = result` claim is (`3*12=36 pencils`, `$12 x 3 = $36`,
`1,200 - 300 = 900`, `(3 + 4) = 7 = 7`). A step whose arithmetic cannot be read is left alone.

It is a program, not a model: held-out sets built with it have exact first-error
labels, and it checks what stage 2 (the model's own corruption) should look like.
The error-type names match the stage-1 signatures in misstep.signatures.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace

from misstep.data.records import Chain
from misstep.metrics.oracle import (
    ANNOTATION,
    LEADING_PUNCTUATION,
    NotArithmetic,
    arith_suffix,
    cut_or_empty,
    evaluate,
    first_error,
    has_operator,
)

INJECTABLE_TYPES = ("arithmetic_slip", "wrong_operand", "wrong_operation", "skipped_step", "misread_quantity")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|\*\*|[-+*/()%]")  # '.5' is a number too
_SWAPS = {"+": "-", "-": "+", "*": "/", "/": "*"}


class InjectionError(ValueError):
    """This chain, step and error type cannot make a labelled error."""


def format_number(value: float) -> str:
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.2f}".rstrip("0").rstrip(".")


def _is_number_token(token: str) -> bool:
    return token[0].isdigit() or token[0] == "."


def _as_written(token: str) -> str:
    return "0" + token if token.startswith(".") else token


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"\d+(?:\.\d+)?", text.replace(",", ""))]


class _Step:
    """One annotated step, split into the text before the annotation, the expression tokens and the rest."""

    def __init__(self, text: str):
        match = ANNOTATION.search(text)
        self.text, self.match = text, match
        self.tokens = _TOKEN.findall(match.group(1)) if match else []
        self.value = evaluate(match.group(2)) if match and _is_number(match.group(2)) else None

    @property
    def annotated(self) -> bool:
        return self.match is not None and self.value is not None and bool(self.tokens)

    def operands(self) -> list[int]:
        return [i for i, token in enumerate(self.tokens) if _is_number_token(token)]

    def rewrite(self, tokens: list[str], value: float) -> str:
        """The step's text with a new expression and result, visible arithmetic included."""
        old_expr, old_result = self.match.group(1), self.match.group(2)
        new_expr, new_result = "".join(tokens), format_number(value)
        before, after = self.text[: self.match.start()], self.text[self.match.end() :]
        # The visible copy: '16 - 3 - 4 = <<16-3-4=9>>9' shows the expression and the result again.
        visible = re.search(r"([\d.,$\s+\-*/x×÷()]+)=\s*\$?\s*$", before)
        if visible and _numbers(visible.group(1)) == _numbers(old_expr):
            pretty = " ".join(tokens).replace("( ", "(").replace(" )", ")")
            before = (
                before[: visible.start(1)]
                + (" " if visible.group(1).startswith(" ") else "")
                + pretty
                + " "
                + before[visible.end(1) :]
            )
        shown = re.match(r"\$?(\d[\d,]*(?:\.\d+)?)", after)
        if shown and shown.group(1).replace(",", "") == old_result:
            after = after[: shown.start(1)] + new_result + after[shown.end(1) :]
        return f"{before}<<{new_expr}={new_result}>>{after}"


# A number as people write it (thousands commas, decimals), an operator (ASCII, 'x', '×', '÷',
# the minus sign and the en dash typesetting puts for '-'),
# a bracket or a percent sign; '$' and spaces between them are formatting.
_PLAIN_TOKEN = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+|[-+*/x×÷()%−–]")
_CANONICAL_OPERATOR = {"x": "*", "×": "*", "÷": "/", "−": "-", "–": "-"}


class _PlainStep:
    """One step of a chain without annotations, read from its one plain `expr = result` claim.

    The same face as `_Step`: the expression's tokens (numbers without their commas, operators
    as Python writes them), the claimed value, and `rewrite`, which puts new numbers and
    operators back in the step's own style ('$', thousands commas, 'x') and repeats the new
    result wherever the claim restates it ('= 36 = 36')."""

    def __init__(self, text: str):
        self.text = text
        self.tokens: list[str] = []
        self.value: float | None = None
        self._token_spans: list[tuple[int, int]] = []
        self._result_spans: list[tuple[int, int]] = []
        claims = _plain_claim_spans(text)
        if len(claims) != 1:  # none, or several: which one later steps build on is a guess
            return
        (start, end), results = claims[0]
        spans = [(m.start() + start, m.end() + start) for m in _PLAIN_TOKEN.finditer(text[start:end])]
        tokens = [_CANONICAL_OPERATOR.get(text[a:b], text[a:b].replace(",", "")) for a, b in spans]
        try:
            value = evaluate(text[results[0][0] : results[0][1]])
            # The tokens must be the expression the oracle reads, nothing lost between them.
            if evaluate("".join(tokens)) != evaluate(text[start:end]):
                return
        except ValueError:
            return
        self.tokens, self._token_spans, self._result_spans, self.value = tokens, spans, results, value

    @property
    def annotated(self) -> bool:  # "readable": named as `_Step`'s, which both serve
        return self.value is not None and bool(self.tokens)

    def operands(self) -> list[int]:
        return [i for i, token in enumerate(self.tokens) if _is_number_token(token)]

    def rewrite(self, tokens: list[str], value: float) -> str:
        edits = []
        for (a, b), old, new in zip(self._token_spans, self.tokens, tokens):
            if new != old:
                edits.append((a, b, self._styled(self.text[a:b], new)))
        for a, b in self._result_spans:
            edits.append((a, b, self._styled(self.text[a:b], format_number(value))))
        text = self.text
        for a, b, new in sorted(edits, reverse=True):
            text = text[:a] + new + text[b:]
        return text

    @staticmethod
    def _styled(old: str, new: str) -> str:
        """`new` (a number, or an operator) written the way `old` was."""
        if new in _SWAPS:  # an operator: keep 'x' and '÷' where the step used them
            typeset = old in ("×", "÷")  # the signs of print; else ASCII ('x' for times where it was used)
            dash = old if old in ("−", "–") else "-"
            return {"*": "×" if typeset else ("x" if old == "x" else "*"), "/": "÷" if typeset else "/", "-": dash}.get(
                new, new
            )
        if "," in old and re.fullmatch(r"-?\d+", new) and abs(int(new)) >= 1000:
            return f"{int(new):,}"
        return new


_RESULT = re.compile(r"\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?%?)")


def _plain_claim_spans(text: str) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """Each plain claim with an operator: (span of its expression, spans of its result and of every
    restatement of the result in a chain 'a = b = b')."""
    equals = [i for i, c in enumerate(text) if c == "="]
    ends = [*equals[1:], len(text)]  # where the text right of each '=' ends
    found = []
    for n, eq in enumerate(equals):
        left = text[equals[n - 1] + 1 if n else 0 : eq]
        run = arith_suffix(left)
        lead = len(run) - len(LEADING_PUNCTUATION.sub("", run))
        expression = run[lead:].rstrip()
        if cut_or_empty(expression):
            continue
        if not has_operator(expression):
            continue  # 'b = b' restates; it claims nothing
        results = _results(text, equals, ends, n)
        if results:
            start = eq - len(run) + lead
            found.append(((start, start + len(expression)), results))
    return found


def _results(text: str, equals: list[int], ends: list[int], n: int) -> list[tuple[int, int]]:
    """The spans of the number right of the n-th '=' and of its restatements ('= 36 = 36'); none
    where the right side is not one number (an expression, a number with a unit glued on)."""
    spans: list[tuple[int, int]] = []
    for m in range(n, len(equals)):
        right = text[equals[m] + 1 : ends[m]]
        number = _RESULT.match(right)
        if not number:
            break
        after = right[number.end() :]
        if re.match(r"[A-Za-z\d]|\.\d", after) or (not spans and re.match(r"\s*[-+*/x×÷^(]\s*[\d($]", after)):
            break  # '240g', '36 + 4': not one number
        span = (equals[m] + 1 + number.start(1), equals[m] + 1 + number.end(1))
        if spans and evaluate(text[span[0] : span[1]]) != evaluate(text[spans[0][0] : spans[0][1]]):
            break  # '= 36 = 37' states something else: not a restatement
        spans.append(span)
        if after.strip():  # words after the number: the chain of '=' ends here
            break
    return spans


def has_annotations(chain: Chain) -> bool:
    """Whether any step of `chain` carries a GSM8K calculator annotation. The held-out splits and
    the control's training chains are built from such chains alone: their labels come from
    GSM8K's own calculator, not from reading prose."""
    return any(ANNOTATION.search(s) for s in chain.steps)


def unreadable_steps(chain: Chain) -> int:
    """How many of `chain`'s steps hold no arithmetic the injector can read (no claim, or several):
    no error is ever put there."""
    parse = _parser(chain.steps)
    return sum(not parse(step).annotated for step in chain.steps)


def _parser(steps: tuple[str, ...] | list[str]):
    """How this chain's steps are read: by their annotations, or (a chain without any) plainly."""
    return _Step if any(ANNOTATION.search(s) for s in steps) else _PlainStep


def _is_number(text: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", text) is not None


def _value(tokens: list[str]) -> float:
    try:
        value = evaluate("".join(tokens))
    except NotArithmetic:
        raise InjectionError(f"'{''.join(tokens)}' is not arithmetic") from None
    if value != value or abs(value) == float("inf"):
        raise InjectionError(f"'{''.join(tokens)}' has no value (division by zero)")
    return value


def _replace_numbers(text: str, changed: dict[str, str]) -> str:
    """Swap whole-number mentions of changed results in prose ('she has 9 eggs left')."""
    for old, new in changed.items():
        text = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d]|\.\d)", new, text)
    return text


def _propagate(steps: list[str], start: int, changed: dict[str, str], parse) -> list[str]:
    """Recompute every step after `start` whose operands used a changed value."""
    out = steps[:start]
    for text in steps[start:]:
        step = parse(text)
        if not step.annotated:
            out.append(_replace_numbers(text, changed))
            continue
        # A changed result is keyed as `format_number` writes it: '.5' is looked up as '0.5'.
        tokens = [changed.get(_as_written(t), t) if _is_number_token(t) else t for t in step.tokens]
        if tokens == step.tokens:
            out.append(text)
            continue
        value = _value(tokens)
        old_result = format_number(step.value)
        new_text = step.rewrite(tokens, value)
        if format_number(value) != old_result:
            changed = {**changed, old_result: format_number(value)}
        out.append(new_text)
    return out


def applicable_steps(chain: Chain, error_type: str) -> list[int]:
    """The steps of `chain` where `error_type` can be injected with an exact label."""
    if error_type not in INJECTABLE_TYPES:
        raise InjectionError(f"unknown error type {error_type!r}; injectable: {', '.join(INJECTABLE_TYPES)}")
    parsed = [_parser(chain.steps)(s) for s in chain.steps]
    question_numbers = {format_number(n) for n in _numbers(chain.question)}
    found = []
    for k, step in enumerate(parsed):
        if not step.annotated:
            continue
        operands = [step.tokens[i] for i in step.operands()]
        if error_type == "arithmetic_slip":
            found.append(k)
        elif error_type == "wrong_operation" and any(t in _SWAPS for t in step.tokens):
            found.append(k)
        elif error_type == "misread_quantity" and any(format_number(float(t)) in question_numbers for t in operands):
            found.append(k)
        elif error_type == "wrong_operand" and _earlier_values(chain, parsed, k) - {
            format_number(float(t)) for t in operands
        }:
            found.append(k)
        elif error_type == "skipped_step" and _first_use(parsed, k) is not None and _start_value(step) is not None:
            found.append(k)
    return found


def _earlier_values(chain: Chain, parsed: list[_Step], k: int) -> set[str]:
    values = {format_number(n) for n in _numbers(chain.question)}
    values |= {format_number(s.value) for s in parsed[:k] if s.annotated}
    return values


def _start_value(step: _Step) -> str | None:
    """The value a step starts from (its first operand that is not its result)."""
    result = format_number(step.value)
    return next((step.tokens[i] for i in step.operands() if format_number(float(step.tokens[i])) != result), None)


def _first_use(parsed: list[_Step], k: int) -> int | None:
    result = format_number(parsed[k].value)
    for j in range(k + 1, len(parsed)):
        if parsed[j].annotated and result in [format_number(float(parsed[j].tokens[i])) for i in parsed[j].operands()]:
            return j
    return None


def inject(chain: Chain, error_type: str, step: int | None = None, seed: int = 0) -> Chain:
    """A copy of `chain` whose first error is of `error_type`, labelled in `mistake_index`.

    `step` is the 0-based step to corrupt (chosen with `seed` among the applicable
    ones when None). For a skipped step the label is where the chain first goes
    wrong without it: the first later step that needed the skipped result.
    """
    if not chain.is_valid:
        raise InjectionError(f"{chain.source_id}: the chain already has a mistake at step {chain.mistake_index}")
    candidates = applicable_steps(chain, error_type)
    if step is None:
        if not candidates:
            raise InjectionError(f"{chain.source_id}: no step where '{error_type}' applies")
        step = random.Random(f"{seed}:{chain.source_id}:{error_type}").choice(candidates)
    elif step not in candidates:
        raise InjectionError(
            f"{chain.source_id}: '{error_type}' does not apply at step {step} (applicable: {candidates})"
        )
    rng = random.Random(f"{seed}:{chain.source_id}:{error_type}:{step}")
    steps = list(chain.steps)
    parse = _parser(chain.steps)
    parsed = parse(steps[step])
    old_result = format_number(parsed.value)
    tokens = list(parsed.tokens)
    label = step

    if error_type == "skipped_step":
        # Drop the step; the next step that used its result takes the value the step started from.
        use = _first_use([parse(s) for s in steps], step)
        changed = {old_result: format_number(float(_start_value(parsed)))}
        steps = steps[:step] + steps[step + 1 :]
        return _finish(chain, _propagate(steps, step, changed, parse), use - 1, changed)

    if error_type == "arithmetic_slip":
        value = parsed.value
        wrong = value + rng.choice([1, -1, 2, 10, -10] if value >= 10 else [1, 2, 3, 10])
        new_text = parsed.rewrite(tokens, wrong)
    else:
        if error_type == "wrong_operation":
            ops = [i for i, t in enumerate(tokens) if t in _SWAPS]
            rng.shuffle(ops)
            for i in ops:
                trial = tokens[:i] + [_SWAPS[tokens[i]]] + tokens[i + 1 :]
                if format_number(_value(trial)) != old_result:
                    tokens = trial
                    break
        elif error_type == "misread_quantity":
            question_numbers = {format_number(n) for n in _numbers(chain.question)}
            i = rng.choice([i for i in parsed.operands() if format_number(float(tokens[i])) in question_numbers])
            original = float(tokens[i])
            tokens[i] = format_number(
                rng.choice(
                    [original + 1, original * 10, original + 10]
                    if original < 10
                    else [original + 1, original - 1, original * 2]
                )
            )
        elif error_type == "wrong_operand":
            i = rng.choice(parsed.operands())
            others = sorted(_earlier_values(chain, [parse(s) for s in chain.steps], step) - {tokens[i]})
            tokens[i] = rng.choice(others)
        wrong = _value(tokens)
        if format_number(wrong) == old_result:
            raise InjectionError(f"{chain.source_id}: '{error_type}' at step {step} leaves the result unchanged")
        new_text = parsed.rewrite(tokens, wrong)
    steps[step] = new_text
    changed = {old_result: format_number(wrong)}
    return _finish(chain, _propagate(steps, step + 1, changed, parse), label, changed)


def _finish(chain: Chain, steps: list[str], label: int, changed: dict[str, str]) -> Chain:
    # The final answer moves with the values it was computed from.
    answer = chain.answer
    parse = _parser(chain.steps)
    final_results = [format_number(s.value) for s in map(parse, steps) if s.annotated]
    original_results = [format_number(s.value) for s in map(parse, chain.steps) if s.annotated]
    if original_results and answer == original_results[-1] and final_results:
        answer = final_results[-1]
    else:
        answer = changed.get(answer, answer)
    # Every label must be one the oracle confirms, so a held-out set never holds an
    # error that is only there by the injector's say-so (a wrong value that happens to
    # equal another right one, say).
    found = first_error(steps, reference=chain.steps)
    if found != label:
        raise InjectionError(f"{chain.source_id}: the oracle finds the first error at {found}, not at {label}")
    return replace(chain, steps=tuple(steps), answer=answer, mistake_index=label)


def types_in_turn(n: int, error_types: list[str] | tuple[str, ...] = INJECTABLE_TYPES) -> list[str]:
    """The error types in the order the `n`-th chain tries them: each chain starts one further on,
    so a list of chains gets the types in turn."""
    k = n % len(error_types)
    return list(error_types[k:]) + list(error_types[:k])


def inject_many(
    chains: list[Chain],
    error_types: list[str] | tuple[str, ...] = INJECTABLE_TYPES,
    seed: int = 0,
    require_answer_change: bool = True,
) -> list[tuple[Chain, Chain, str]]:
    """(valid, corrupted, error type) for each chain, cycling through error types and
    skipping chains where none applies. With `require_answer_change`, only errors that
    change the final answer count: an error that does not matter is no test of recovery.
    The result is a pure function of the inputs."""
    out = []
    for n, chain in enumerate(chains):
        order = types_in_turn(n, error_types)
        for error_type in order:
            try:
                corrupted = inject(chain, error_type, seed=seed)
            except InjectionError:
                continue
            if require_answer_change and corrupted.answer == chain.answer:
                continue
            out.append((chain, corrupted, error_type))
            break
    return out
