"""Active selection as a curriculum: which difficulty level the next round's seed chains come from.

Each round the current model is probed at every level (location of injected first errors, as the
held-out sets measure it), and each level's success above chance is taken: its accuracy minus its
own majority baseline, as a share of what is left to gain above that baseline (1 where the model is
always right, 0 where it does no better than the majority label). The frontier is the level where
that share is closest to one half: the model learns little from what it already solves, or from
what is far beyond it. The curriculum moves at most one level a round toward the frontier.

    probe = [LevelProbe(level=1, n=40, correct=30, majority_correct=20), ...]
    choice = choose_level(probe, current=2)   # choice.level, choice.reason
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LevelProbe:
    """The current model's location accuracy at one level, beside that level's majority baseline."""

    level: int
    n: int
    correct: int
    majority_correct: int

    @property
    def progress(self) -> float:
        """Success above chance as a share of what is left to gain above it (may be below 0)."""
        room = self.n - self.majority_correct
        return (self.correct - self.majority_correct) / room if room else 1.0


@dataclass(frozen=True)
class LevelChoice:
    level: int
    frontier: int  # the level the probe put the frontier at
    reason: str


def choose_level(probe: list[LevelProbe], current: int) -> LevelChoice:
    """The next round's level: one step from `current` toward the frontier (or `current` if it is there).

    Ties in distance from one half go to the hardest level the model has half-mastered, else to the
    easiest level: a model that solves everything moves up, one that solves nothing moves down."""
    if not probe:
        raise ValueError("an empty probe cannot choose a level")
    levels = sorted(p.level for p in probe)
    if current not in levels:
        raise ValueError(f"the current level {current} is not among the probed levels {levels}")
    frontier = min(probe, key=lambda p: (abs(p.progress - 0.5), -p.level if p.progress >= 0.5 else p.level)).level
    step = (frontier > current) - (frontier < current)
    level = levels[levels.index(current) + step]
    figures = ", ".join(
        f"level {p.level}: {p.correct}/{p.n} vs majority {p.majority_correct} ({p.progress:+.2f})"
        for p in sorted(probe, key=lambda p: p.level)
    )
    where = (
        "at the frontier" if step == 0 else ("toward the harder frontier" if step > 0 else "toward the easier frontier")
    )
    return LevelChoice(
        level, frontier, f"level {level} ({where}: level {frontier} is closest to half-mastered; {figures})"
    )
