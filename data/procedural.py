"""Arithmetic word problems made on demand, with exact step-by-step solutions: valid chains that
never run out, at a difficulty set by a few knobs.

Each problem follows one quantity of one person's things through `steps` operations (more bought,
some given away, a collection multiplied, shared out evenly), with `distractors` sentences about
other quantities the solution never uses. The solution is written as GSM8K writes its own, one
step a line with a `<<a*b=c>>` annotation and `#### answer` at the end, and read by the GSM8K
loader, so the chains are the loaders' `Chain` records and the injector and the oracle work on
them as they are.

    chain = make_chain(LADDER[2], seed=7)        # the same seed, the same chain
    chains = make_chains(LADDER[2], 100, seed=1, exclude=heldout_questions)

No library writes GSM8K-shaped solutions with these knobs (iGSM, the nearest, is not packaged
and writes its own solution format), so this is written here, small.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from misstep.data.loaders import gsm8k_chains
from misstep.data.records import Chain
from misstep.data.splits import normalize_question

OPERATIONS = ("+", "-", "*", "/")


@dataclass(frozen=True)
class Difficulty:
    """One rung of the ladder: the knobs a problem is made with."""

    level: int
    steps: int  # operations in the solution, one step each
    max_number: int  # the largest number a problem starts from or adds
    ops: tuple[str, ...]  # the operations drawn from ("+", "-", "*", "/")
    distractors: int  # stated quantities the solution does not use

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_number < 10 or self.distractors < 0:
            raise ValueError(f"level {self.level}: steps >= 1, max_number >= 10 and distractors >= 0 are needed")
        if not self.ops or set(self.ops) - set(OPERATIONS):
            raise ValueError(f"level {self.level}: ops must be drawn from {OPERATIONS}, not {self.ops}")


# Ordered from easy to hard; each level turns one or two knobs past the one before.
LADDER: tuple[Difficulty, ...] = (
    Difficulty(1, steps=2, max_number=20, ops=("+", "-"), distractors=0),
    Difficulty(2, steps=3, max_number=50, ops=("+", "-"), distractors=0),
    Difficulty(3, steps=3, max_number=100, ops=("+", "-", "*"), distractors=1),
    Difficulty(4, steps=4, max_number=200, ops=("+", "-", "*", "/"), distractors=1),
    Difficulty(5, steps=5, max_number=500, ops=("+", "-", "*", "/"), distractors=2),
    Difficulty(6, steps=7, max_number=1000, ops=("+", "-", "*", "/"), distractors=3),
)


def difficulty_of(level: int) -> Difficulty:
    """The ladder's rung numbered `level`."""
    for difficulty in LADDER:
        if difficulty.level == level:
            return difficulty
    raise ValueError(f"level must be one of {[d.level for d in LADDER]}, not {level}")


NAMES = ("Maya", "Omar", "Lena", "Tariq", "Sofia", "Kenji", "Amara", "Lucas", "Priya", "Mateo", "Ingrid", "Kwame")
THINGS = ("apples", "stickers", "marbles", "books", "coins", "pencils", "stamps", "shells", "cards", "beads")
OTHERS = ("brother", "sister", "neighbour", "cousin", "teacher", "friend")


@dataclass(frozen=True)
class _Step:
    sentence: str  # what the question says happens
    solution: str  # the solution's line, with its annotation


def make_chain(difficulty: Difficulty, seed: int) -> Chain:
    """One valid chain at `difficulty`, the same for the same seed."""
    rng = random.Random(f"{difficulty}:{seed}")
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randint(max(2, difficulty.max_number // 4), difficulty.max_number)
    question = [f"{name} has {value} {thing}."]
    solution = []
    for _ in range(difficulty.steps):
        step, value = _operation(rng, difficulty, name, thing, value)
        question.append(step.sentence)
        solution.append(step.solution)
    for _ in range(difficulty.distractors):  # anywhere after the opening sentence
        other, count = rng.choice(OTHERS), rng.randint(2, difficulty.max_number)
        things = rng.choice([t for t in THINGS if t != thing])
        question.insert(rng.randint(1, len(question)), f"{name}'s {other} has {count} {things}.")
    question.append(f"How many {thing} does {name} have now?")
    record = {"question": " ".join(question), "answer": "\n".join(solution) + f"\n#### {value}"}
    [chain] = gsm8k_chains(Path(f"procedural/level-{difficulty.level}"), [(seed, record)])
    return chain


def _operation(rng: random.Random, difficulty: Difficulty, name: str, thing: str, value: int) -> tuple[_Step, int]:
    """One operation on `value` that keeps it a whole number of at least 2, and the new value."""
    divisors = [d for d in (2, 3, 4, 5) if value % d == 0 and value // d >= 2]
    choices = [op for op in difficulty.ops if (op != "-" or value > 2) and (op != "/" or divisors)]
    op = rng.choice(choices or ["+"])
    if op == "+":
        n = rng.randint(2, difficulty.max_number)
        new = value + n
        sentence = f"{name} gets {n} more {thing}."
        return _Step(sentence, f"{name} then has {value} + {n} = <<{value}+{n}={new}>>{new} {thing}."), new
    if op == "-":
        n = rng.randint(1, value - 2)
        new = value - n
        other = rng.choice(OTHERS)
        sentence = f"{name} gives {n} {thing} to a {other}."
        return _Step(sentence, f"{name} has {value} - {n} = <<{value}-{n}={new}>>{new} {thing} left."), new
    if op == "*":
        n = rng.randint(2, 4)
        new = value * n
        sentence = f"{name}'s collection of {thing} then grows to {n} times its size."
        return _Step(sentence, f"{name} now has {value} * {n} = <<{value}*{n}={new}>>{new} {thing}."), new
    n = rng.choice(divisors)
    new = value // n
    sentence = f"{name} splits the {thing} into {n} equal piles and keeps one pile."
    return _Step(sentence, f"{name} keeps {value} / {n} = <<{value}/{n}={new}>>{new} {thing}."), new


def make_chains(
    difficulty: Difficulty, n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[Chain]:
    """`n` different chains at `difficulty`, none of whose questions is in `exclude` (normalised
    question texts, e.g. of held-out sets: `data.splits.normalize_question`)."""
    chains, seen = [], set(exclude)
    for index in range(n * 50):  # a small level has fewer distinct problems than a large n asks for
        chain = make_chain(difficulty, seed * 1_000_003 + index)
        key = normalize_question(chain.question)
        if key in seen:
            continue
        seen.add(key)
        chains.append(chain)
        if len(chains) == n:
            return chains
    raise ValueError(f"level {difficulty.level} gave only {len(chains)} distinct new problems of the {n} asked for")
