"""Constrained decoding in the embedded engine: each row's next token is one its grammar allows.

A request may carry an answer constraint (programs/answer_format.py): an EBNF grammar, which
xgrammar (the library behind vLLM's structured outputs) compiles against the tokenizer, and a
closing plan. Each constrained row keeps a `RowConstraint`: before a pick, the grammar's mask sets
every token it refuses to -inf, so greedy and sampled rows alike pick only what parses; a drafted
token counts only where the masked greedy pick is that token, so speculation keeps the answer the
constrained greedy one.

Closing in time: free text could run an answer to its token limit unclosed. When a row in a free
text field has only as many tokens left as closing needs (what follows that field, and room for
each later field's value), its next tokens are forced: the text ends there and the next marker
follows; a later free-text field is left empty, a later typed value is still the model's pick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import xgrammar as xgr

# Tokens of slack per field still to close: the model may spell a marker in more tokens than the
# tokenizer's own encoding of it, which is what the reserve counts.
SLACK = 2


@dataclass(frozen=True)
class Closing:
    """A closing plan in tokens: per field its marker, the tokens that end it, whether it is free
    text, and how many tokens closing needs from inside it (None for a typed field: never cut)."""

    markers: tuple[str, ...]
    after: tuple[tuple[int, ...], ...]
    reserve: tuple[int | None, ...]

    @property
    def most(self) -> int:
        """The most tokens closing can need: below it, check where the answer is."""
        return max((r for r in self.reserve if r is not None), default=0)


class Grammars:
    """One engine's grammar compiler: the tokenizer's vocabulary, and compiled grammars cached by text."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer = tokenizer
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._closing = lru_cache(maxsize=256)(self._closing_of)

    def constraint(self, payload: dict) -> RowConstraint:
        """A row's constraint from a request's payload (`AnswerFormat.payload()`); a grammar the
        compiler refuses raises here, failing that request alone."""
        grammar = payload["structured_outputs"]["grammar"]
        matcher = xgr.GrammarMatcher(self.compiler.compile_grammar(grammar))
        closing = self._closing(tuple(tuple(f) for f in payload.get("closing", ())))
        return RowConstraint(matcher, closing, self.tokenizer)

    def _closing_of(self, plan: tuple[tuple, ...]) -> Closing:
        markers, texts, free, most_chars = zip(*plan) if plan else ((), (), (), ())
        after = tuple(tuple(self.tokenizer.encode(text, add_special_tokens=False)) for text in texts)
        # Closing from field i writes what follows it, then each later field's marker and, for a typed
        # field, room for its value (a later free field is left empty).
        needs = [len(after[j]) + SLACK + (0 if free[j] else most_chars[j]) for j in range(len(plan))]
        reserve = tuple(sum(needs[index:]) if free[index] else None for index in range(len(plan)))
        return Closing(tuple(markers), after, reserve)

    def bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.info.vocab_size)


@dataclass
class RowConstraint:
    matcher: xgr.GrammarMatcher
    closing: Closing
    tokenizer: object
    forced: list[int] = field(default_factory=list)  # tokens that must come next (closing in time)
    broken: bool = False  # a token the grammar refused got in (cannot happen by the mask): unconstrained from then

    def fill(self, bitmask: torch.Tensor, row: int, tokens: Sequence[int], left: int) -> None:
        """Write into `bitmask[row]` the tokens this row may pick next, having written `tokens` with
        `left` more allowed."""
        if self.broken:
            return
        if not self.forced and left <= self.closing.most:
            self.forced = self._closing_tokens(tokens, left)
        if self.upcoming():
            only(bitmask, row, self.forced[0])
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def upcoming(self) -> list[int]:
        """The tokens the row must write next: the closing being forced, else where the grammar
        allows one continuation (a marker), that text in the tokenizer's own tokens: the spelling
        the training data has, in the fewest tokens."""
        if not self.forced and not self.broken:
            jump = self.matcher.find_jump_forward_string()
            if jump:
                self.forced = self.tokenizer.encode(jump, add_special_tokens=False)
        return self.forced

    def accept(self, token: int) -> None:
        """The row took `token` (not an end-of-sequence one)."""
        if self.broken:
            return
        if self.forced:
            self.forced.pop(0)
        if not self.matcher.accept_token(token):
            self.broken = True

    def drafts_kept(self, logits: torch.Tensor, drafts: Sequence[int], tokens: Sequence[int], left: int) -> int:
        """How many of `drafts` constrained greedy decoding keeps: draft j stays while it is the
        forced token, or the masked argmax of `logits[j]` (the model's logits before it, masked in
        place). None within closing distance of the budget."""
        if self.broken:
            return 0
        forced, kept = list(self.forced), 0
        bitmask = xgr.allocate_token_bitmask(1, logits.shape[-1])
        for j, draft in enumerate(drafts):
            if left - j <= self.closing.most:
                break
            if self.upcoming():
                agrees = draft == self.forced[0]
            else:
                self.matcher.fill_next_token_bitmask(bitmask, 0)
                xgr.apply_token_bitmask_inplace(logits[j : j + 1], bitmask)
                agrees = int(logits[j].argmax()) == draft
            if not agrees:
                break
            self.accept(draft)
            kept += 1
        if kept:
            self.matcher.rollback(kept)
        self.forced, self.broken = forced, False
        return kept

    def _closing_tokens(self, tokens: Sequence[int], left: int) -> list[int]:
        """The tokens to force now, if the row is in free text with no more tokens left than
        closing needs (else none). Where the grammar already allows one continuation (inside a
        marker) it is left to the mask."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        current = next((i for i in reversed(range(len(self.closing.markers))) if self.closing.markers[i] in text), None)
        if current is None:
            return []
        reserve = self.closing.reserve[current]
        if reserve is None or left > reserve or self.matcher.find_jump_forward_string():
            return []
        return list(self.closing.after[current])


def only(bitmask: torch.Tensor, row: int, token: int) -> None:
    """`bitmask[row]` allows `token` alone."""
    bitmask[row] = 0
    bit = 1 << (token % 32)
    bitmask[row, token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: the top bit is the sign


def mask(
    logits: torch.Tensor, grammars: Grammars, rows: Sequence[tuple[int, RowConstraint, Sequence[int], int]]
) -> None:
    """Mask `logits` (rows x vocabulary) in place for the constrained `rows`: (row, constraint,
    tokens written, tokens left). Unlisted rows keep every token."""
    if not rows:
        return
    bitmask = grammars.bitmask(logits.shape[0])
    for row, constraint, tokens, left in rows:
        constraint.fill(bitmask, row, tokens, left)
    xgr.apply_token_bitmask_inplace(logits, bitmask)
