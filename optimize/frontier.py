"""A round's seed chains from the procedural problems (data/procedural.py), at the level the
curriculum chooses (optimize/curriculum.py) or at levels drawn uniformly.

    pool, choice = procedural_pool(round)   # the chains to write scenarios from, and why

The curriculum probes the current model at every level first: `probe_items` injected chains a
level, made from seeds neither the training chains nor the held-out sets are made from, located
by the student as the held-out sets are (RUN_DIR/round-N/probe/level-<k>/, resumable).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from misstep.data.procedural import LADDER, Difficulty, difficulty_of, make_chains
from misstep.data.records import Chain
from misstep.data.splits import load_split, normalize_question, split_path
from misstep.optimize.curriculum import LevelProbe, choose_level
from misstep.optimize.demos import demos_of
from misstep.optimize.jobs import JobSettings, evaluate, labelled_chains
from misstep.optimize.settings import LEVEL_SELECTIONS
from misstep.programs import SelfCorrector

PROBE_SEEDS = 10**6  # probe chains' seeds start here; training chains' seeds stay far below


def heldout_questions(levels: tuple[Difficulty, ...] = LADDER) -> set[str]:
    """The normalised questions of every committed level split (test and validation)."""
    return {
        normalize_question(item.chain.question)
        for d in levels
        for split in ("test", "validation")
        for item in load_split(split_path(f"level-{d.level}", split))
    }


def procedural_pool(
    student: SelfCorrector,
    folder: Path,
    previous_level: int | None,
    *,
    selection: str,
    start_level: int,
    n: int,
    probe_items: int,
    seed: int,
    num_threads: int,
    constrained: bool = True,
    exclude: set[str],
) -> tuple[list[Chain], dict[str, Any]]:
    """`n` valid chains for round `folder`'s seeds, none of whose questions is in `exclude`, and the
    record of how they were chosen (for selection.json)."""
    if selection not in LEVEL_SELECTIONS:
        raise ValueError(f"level selection must be one of {LEVEL_SELECTIONS}, not {selection!r}")
    rng = random.Random(seed)
    if selection == "uniform":
        counts = [0] * len(LADDER)
        for _ in range(n):
            counts[rng.randrange(len(LADDER))] += 1
        pool = [c for d, k in zip(LADDER, counts) if k for c in make_chains(d, k, seed=seed, exclude=exclude)]
        return pool, {"selection": "uniform", "levels": {d.level: k for d, k in zip(LADDER, counts)}}
    probe = probe_levels(
        student,
        folder / "probe",
        probe_items,
        seed=PROBE_SEEDS + seed,
        num_threads=num_threads,
        constrained=constrained,
    )
    current = start_level if previous_level is None else previous_level
    choice = choose_level(probe, current)
    difficulty = difficulty_of(choice.level)
    return make_chains(difficulty, n, seed=seed, exclude=exclude), {
        "selection": "curriculum",
        "level": choice.level,
        "frontier": choice.frontier,
        "difficulty": {**asdict(difficulty), "ops": list(difficulty.ops)},
        "probe": [asdict(p) for p in probe],
        "reason": choice.reason,
    }


def probe_levels(
    student: SelfCorrector, folder: Path, items: int, seed: int, num_threads: int, constrained: bool = True
) -> list[LevelProbe]:
    """The student's location accuracy at every level, beside each level's majority baseline."""
    lm = student.predictors()[0].lm
    demos = demos_of(student)
    probe = []
    for difficulty in LADDER:
        chains = labelled_chains(make_chains(difficulty, items, seed=seed), items, seed)
        job = JobSettings(folder / f"level-{difficulty.level}", num_threads, demos, constrained=constrained)
        measured = evaluate(chains, lm, job, recover=False)["gsm8k"]
        located, majority = measured["location_accuracy"], measured["majority_baseline"]
        probe.append(LevelProbe(difficulty.level, located["n"], located["k"], majority["k"]))
    return probe


def previous_level(run_dir: Path, round_index: int) -> int | None:
    """The level the round before chose (None before the first procedural round)."""
    path = run_dir / f"round-{round_index - 1}" / "selection.json"
    return json.loads(path.read_text()).get("procedural", {}).get("level") if path.exists() else None
