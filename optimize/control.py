"""The positive control: can the pipe from data to weights teach stage 3 (locate the first error)?

Stage 3 alone is fine-tuned on chains the injector labelled (no model wrote a label), with
first-error positions balanced across steps and a share of valid chains answered "no
mistake", then measured on a committed held-out split beside the majority and last-step
baselines. The cue control does the same with the erroneous step visibly marked
(" (check this step)") in training and test chains: a pipe that cannot learn that cannot learn
anything, and is broken.

One run is one trained model: `ControlRun` names its settings; `run_control` trains it (a
killed training resumes from its last checkpoint), evaluates it item by item (appended, so a
killed evaluation resumes too) and writes `result.json`. Runs already finished are skipped.
Settings are chosen on the validation split and the chosen run reported on the test split: one
trained model is measured on each split asked for, a file each.

    RUN_DIR/<run name>/train_records.jsonl   the exact training data
                       model/                the weights, train_log.jsonl, train_summary.json
                       predictions.jsonl     one line per test item (metrics/heldout.py)
                       result.json           accuracy, baselines, McNemar p, settings, timings
                       predictions-validation.jsonl, result-validation.json   the same on validation
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import dspy

from misstep.data.procedural import difficulty_of, make_chains
from misstep.data.records import Chain, format_steps
from misstep.data.runfiles import holds_run_dir, write_json_atomic, write_jsonl_atomic
from misstep.data.splits import SplitItem, load_split, shuffled, split_path, without_heldout
from misstep.lm.checkpoint import SUMMARY, checkpoint_problem
from misstep.lm.client import local_lm, release
from misstep.lm.launch import train
from misstep.lm.training import LOSS_WEIGHTINGS, TrainSettings
from misstep.metrics.checks import location_correct
from misstep.metrics.heldout import confusion, read_predictions, score, slices
from misstep.metrics.injector import (
    INJECTABLE_TYPES,
    InjectionError,
    applicable_steps,
    has_annotations,
    inject,
    inject_many,
    types_in_turn,
)
from misstep.metrics.oracle import first_error
from misstep.optimize.demos import chat_records, ground_truth_chat_data, ground_truth_demos
from misstep.optimize.frontier import heldout_questions
from misstep.programs import SelfCorrectionCycle, SelfCorrector
from misstep.programs.answer_format import AnswerAdapter
from misstep.programs.parallel import map_logged

CUE = " (check this step)"
VALID_SHARE = 0.15
# First-error positions are balanced over steps 1..POSITIONS-1 and one bucket for every later step.
POSITIONS = 6
# Where the training chains' first errors lie: "balanced" over the position buckets above (which
# puts most late errors on a chain's last step, since few chains are long); "natural", the
# injector's own choice among a chain's steps, the way the held-out splits are drawn, so no
# shortcut (the last step, a position) pays more in training than it does on held-out items;
# "pairs", each question twice with its first error at two different steps, so that only the
# steps' content tells the labels apart.
POSITION_MODES = ("balanced", "natural", "pairs")
LOSSES = ("stage3", "all")
CUE_MODES = ("cue", "real")  # the erroneous step marked in the chains, or not


def mark_first_error(chain: Chain, cue: str = CUE) -> Chain:
    """The chain with `cue` appended to its first erroneous step (a valid chain is unchanged)."""
    if chain.mistake_index is None:
        return chain
    steps = list(chain.steps)
    steps[chain.mistake_index] += cue
    return replace(chain, steps=tuple(steps))


def _bucket(label: int) -> int:
    return min(label, POSITIONS - 1)


def control_chains(
    pool: list[Chain],
    n: int,
    valid_share: float = VALID_SHARE,
    seed: int = 0,
    positions: str = "balanced",
    error_types: tuple[str, ...] = INJECTABLE_TYPES,
) -> list[Chain]:
    """`n` labelled chains from valid `pool` chains: `round(n * valid_share)` valid ones, the rest
    injected, `error_types` in turn, with first errors placed by `positions` (POSITION_MODES).
    "balanced": one chain per question, positions as even across buckets as the pool allows, each
    bucket at most its even share, ceil(invalid / POSITIONS); where the pool runs out under that
    cap, the cap rises by one and the unused chains are tried again. A pure function of the inputs."""
    if positions not in POSITION_MODES:
        raise ValueError(f"positions takes {' or '.join(POSITION_MODES)}, not {positions!r}")
    n_valid = round(n * valid_share)
    n_invalid = n - n_valid
    checkable = [c for c in shuffled(pool, seed) if c.is_valid and first_error(c.steps) is None]
    valid = checkable[1::2][:n_valid]  # valid and invalid chains from the same stretch of the pool
    taken = {id(c) for c in valid}
    if positions == "natural":
        rest = [c for c in checkable if id(c) not in taken and has_annotations(c)]
        invalid = [bad for _, bad, _ in inject_many(rest, error_types, seed=seed)][:n_invalid]
    elif positions == "pairs":
        invalid = _paired_injections([c for c in checkable if id(c) not in taken], n_invalid, seed, error_types)
    else:
        invalid = _balanced_chains(checkable, taken, n_invalid, seed, error_types)
    if len(invalid) < n_invalid or len(valid) < n_valid:
        raise ValueError(
            f"the pool of {len(pool)} chains gives {len(invalid)} invalid and {len(valid)} valid "
            f"chains, fewer than the {n_invalid} and {n_valid} asked for"
        )
    return shuffled(invalid + valid, seed)


def _balanced_chains(
    checkable: list[Chain], taken: set[int], n_invalid: int, seed: int, error_types: tuple[str, ...]
) -> list[Chain]:
    counts: Counter[int] = Counter()
    invalid: list[Chain] = []
    # Each pass under a higher cap asks the same chains again; short chains (two or three steps)
    # reach few buckets, so the cap climbs one pass at a time for many passes. What a chain can
    # take is worked out once (the injector is deterministic).
    candidates: dict[int, list[tuple[str, int]]] = {}
    injected: dict[tuple[int, str, int], Chain | None] = {}
    cap = math.ceil(n_invalid / POSITIONS)
    while len(invalid) < n_invalid:
        before = len(invalid)
        for number, chain in enumerate(checkable):
            if len(invalid) == n_invalid:
                break
            if id(chain) in taken:
                continue
            if id(chain) not in candidates:
                candidates[id(chain)] = _candidates(chain, number, error_types) if has_annotations(chain) else []
            bad = _balanced_injection(chain, candidates[id(chain)], counts, cap, seed, injected)
            if bad is not None:
                taken.add(id(chain))
                counts[_bucket(bad.mistake_index)] += 1
                invalid.append(bad)
        if len(invalid) == before and cap >= n_invalid:
            break  # no chain left that takes an error, whatever the cap
        cap += 1
    return invalid


def _paired_injections(chains: list[Chain], n_invalid: int, seed: int, error_types: tuple[str, ...]) -> list[Chain]:
    """Two injected versions of each chain (until `n_invalid`), their first errors at different steps:
    the injector's own choice, then one drawn among the other (error type, step) choices that put
    the first error elsewhere. Both change the answer."""
    out: list[Chain] = []
    for number, chain in enumerate(chains):
        if len(out) >= n_invalid:
            break
        if not has_annotations(chain):
            continue
        versions: list[Chain] = []
        in_turn = types_in_turn(number, error_types)
        choices = [(t, step) for t in in_turn for step in applicable_steps(chain, t)]
        random.Random(f"{seed}:{chain.source_id}").shuffle(choices)
        for error_type, step in [(t, None) for t in in_turn] + choices:
            try:
                bad = inject(chain, error_type, step=step, seed=seed)
            except InjectionError:
                continue
            if bad.answer != chain.answer and all(v.mistake_index != bad.mistake_index for v in versions):
                versions.append(bad)
            if len(versions) == 2:
                out += versions
                break
    return out[:n_invalid]


def _candidates(chain: Chain, number: int, error_types: tuple[str, ...]) -> list[tuple[str, int]]:
    """The (error type, step) pairs the injector may try on the `number`th chain, in its turn's order."""
    return [
        (error_type, step)
        for error_type in types_in_turn(number, error_types)
        for step in applicable_steps(chain, error_type)
    ]


def _balanced_injection(
    chain: Chain,
    candidates: list[tuple[str, int]],
    counts: Counter,
    cap: int,
    seed: int,
    injected: dict[tuple[int, str, int], Chain | None],
) -> Chain | None:
    """`chain` with an error whose first-error bucket is the emptiest still under `cap`, or None.
    `injected` remembers each (chain, error type, step) tried."""
    # The emptiest bucket first; a skipped step's label lies after the step, so it is found by trying.
    for error_type, step in sorted(candidates, key=lambda c: counts[_bucket(c[1])]):
        key = (id(chain), error_type, step)
        if key not in injected:
            try:
                bad = inject(chain, error_type, step=step, seed=seed)
            except InjectionError:
                bad = None
            injected[key] = bad if bad is not None and bad.answer != chain.answer else None
        bad = injected[key]
        if bad is not None and counts[_bucket(bad.mistake_index)] < cap:
            return bad
    return None


def locate_example(chain: Chain) -> dspy.Example:
    """Stage 3's worked example for a labelled chain: the 1-based first wrong step, or 0 and no mistake."""
    return dspy.Example(
        question=chain.question,
        chain=format_steps(chain.steps),
        has_mistake=chain.mistake_index is not None,
        first_error_step=0 if chain.mistake_index is None else chain.mistake_index + 1,
    )


def training_records(chains: list[Chain], *, cue: bool, loss: str, seed: int = 0) -> list[dict]:
    """Chat records for the control: stage 3 on every chain (marked where `cue`), and with
    loss="all" also the other stages' ground truth, one record per stage for every valid
    source chain — the mix the loop trains on, where stage 3 is a minority of the tokens."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    shown = [mark_first_error(c) if cue else c for c in chains]
    records = chat_records(SelfCorrector().locate, [locate_example(c) for c in shown], AnswerAdapter())
    if loss == "all":
        sources = [c for c in chains if c.mistake_index is None]
        truth = ground_truth_demos(sources, k=len(sources), seed=seed)
        truth["locate"] = []  # stage 3 is above, on the control's own balanced chains
        records += ground_truth_chat_data(SelfCorrectionCycle("arithmetic_slip"), truth, AnswerAdapter())
        random.Random(seed).shuffle(records)
    return records


@dataclass(frozen=True)
class ControlRun:
    """One trained model of the control."""

    train_records: int  # stage-3 training chains
    cue: bool
    learning_rate: float
    epochs: float
    loss: str = "stage3"
    seed: int = 0
    adam_beta2: float = 0.999
    loss_weighting: str = "tokens"  # TrainSettings.loss_weighting
    positions: str = "balanced"  # POSITION_MODES: where the training chains' first errors lie
    level: int | None = None  # training chains from this procedural level (data/procedural.py), not GSM8K
    lora_rank: int | None = None  # a LoRA adapter of this rank on every linear layer; None: a full fine-tune
    # One injected error type alone, in training and in what is measured (that type's held-out items
    # and the valid chains); None: every type, in turn.
    error_type: str | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions takes {' or '.join(POSITION_MODES)}, not {self.positions!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss takes {' or '.join(LOSSES)}, not {self.loss!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting takes {' or '.join(LOSS_WEIGHTINGS)}, not {self.loss_weighting!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be positive, not {self.lora_rank}")
        if self.error_type is not None and self.error_type not in INJECTABLE_TYPES:
            raise ValueError(f"error_type takes one of {', '.join(INJECTABLE_TYPES)}, not {self.error_type!r}")

    @property
    def name(self) -> str:
        beta2 = "" if self.adam_beta2 == 0.999 else f"-b{self.adam_beta2:g}"
        weighting = "" if self.loss_weighting == "tokens" else f"-w{self.loss_weighting}"
        positions = "" if self.positions == "balanced" else f"-p{self.positions}"
        level = "" if self.level is None else f"-level{self.level}"
        lora = "" if self.lora_rank is None else f"-lora{self.lora_rank}"
        error_type = "" if self.error_type is None else f"-{self.error_type}"
        return (
            f"{'cue' if self.cue else 'real'}-n{self.train_records}-lr{self.learning_rate:g}"
            f"-e{self.epochs:g}-{self.loss}{beta2}{weighting}{positions}{level}{lora}{error_type}-s{self.seed}"
        )

    @property
    def error_types(self) -> tuple[str, ...]:
        """The types its training chains are injected with."""
        return INJECTABLE_TYPES if self.error_type is None else (self.error_type,)


def measured_items(items: list[SplitItem], error_type: str | None) -> list[SplitItem]:
    """What a run of `error_type` is measured on: that type's items and the valid chains (every item
    where it is None)."""
    if error_type is None:
        return items
    return [item for item in items if item.error_type == error_type or item.chain.mistake_index is None]


def control_grid(
    *,
    sizes: list[int] | None = None,
    modes: list[str] | None = None,
    learning_rates: list[float] | None = None,
    epochs: list[float] | None = None,
    losses: list[str] | None = None,
    adam_beta2s: list[float] | None = None,
    loss_weightings: list[str] | None = None,
    seed: int = 0,
    positions: list[str] | None = None,
    level: int | None = None,
    lora_rank: int | None = None,
    error_type: str | None = None,
) -> list[ControlRun]:
    """One run for every combination of the settings given (`modes`: "cue" and/or "real"), in that
    order; a setting not given takes its default (1,000 records, both modes, lr 1e-4, 1 epoch, the
    stage-3 loss, beta2 0.999, a plain mean over tokens, balanced positions); every run trains on
    `level`'s procedural problems where one is given, else on GSM8K, and trains a LoRA adapter of
    `lora_rank` where one is given, else every weight; with `error_type`, on that type alone."""
    modes = modes or list(CUE_MODES)
    error_type = None if error_type is None else str(error_type)  # a command line's choice is an enum member
    unknown = sorted(set(modes) - set(CUE_MODES))
    if unknown:
        raise ValueError(f"modes takes {' or '.join(CUE_MODES)}, not {unknown}")
    return [
        ControlRun(
            train_records=n,
            cue=mode == "cue",
            learning_rate=lr,
            epochs=e,
            loss=str(loss),
            seed=seed,
            adam_beta2=b2,
            loss_weighting=str(w),
            positions=str(p),
            level=level,
            lora_rank=lora_rank,
            error_type=error_type,
        )
        for n in sizes or [1000]
        for mode in modes
        for lr in learning_rates or [1e-4]
        for e in epochs or [1.0]
        for loss in losses or ["stage3"]
        for b2 in adam_beta2s or [0.999]
        for w in loss_weightings or ["tokens"]
        for p in positions or ["balanced"]
    ]


def procedural_training_pool(level: int, n: int, seed: int = 0) -> list[Chain]:
    """`n` valid chains at procedural `level`, none of them a question of any committed level split:
    the control's pool where it asks whether the easiest problems' errors can be located."""
    return make_chains(difficulty_of(level), n, seed=seed, exclude=heldout_questions())


def training_pool(chains: list[Chain], splits: Path | None = None) -> list[Chain]:
    """`chains` without a question of either committed GSM8K split, whichever is measured."""
    committed = [
        item.chain for name in ("test", "validation") for item in load_split(split_path("gsm8k", name, splits))
    ]
    return without_heldout(chains, committed)


def evaluate_location(
    items: list[SplitItem],
    lm: dspy.LM,
    path: Path,
    *,
    cue: bool,
    num_threads: int = 8,
    show_progress: bool = True,
    constrained: bool = False,
) -> dict[str, dict[str, Any]]:
    """Stage 3 on every item (chains marked where `cue`), appended to `path` as predictions.jsonl
    lines; items already there are not asked again. Returns the predictions by item id."""
    corrector = SelfCorrector()

    def locate(item: SplitItem) -> dict[str, Any]:
        chain = mark_first_error(item.chain) if cue else item.chain
        located, predicted = corrector.find_error(chain.question, chain.steps)
        return {
            "item_id": item.item_id,
            "task": chain.task,
            "gold": chain.mistake_index,
            "predicted": predicted,
            "correct": located.ok and location_correct(predicted, chain.mistake_index),
            "parsed": located.ok,
            "raw": located.raw,
        }

    records = map_logged(
        locate,
        items,
        path,
        lambda item: item.item_id,
        key="item_id",
        lm=lm,
        adapter=AnswerAdapter(constrained),
        num_threads=num_threads,
        description="locating",
        show_progress=show_progress,
    )
    return {r["item_id"]: r for r in records}


@holds_run_dir(lambda args: args["run_dir"] / args["run"].name)
def run_control(
    run: ControlRun,
    pool: list[Chain],
    items: list[SplitItem],
    *,
    model_dir: Path,
    run_dir: Path,
    settings: TrainSettings,
    num_threads: int = 8,
    show_progress: bool = True,
    constrained: bool = False,
) -> dict[str, Any]:
    """Train `run`'s model from `model_dir` on chains from `pool` (held-out questions removed),
    evaluate it on `items` (those of its error type, where it has one: `measured_items`), and write
    result.json into `run_dir`/<run name>; a finished run is read back.
    `constrained` measures stage 3 under its answer grammar (into files of its own: the model is the
    same). The run's folder is this process's while it runs (`RunLock`)."""
    folder = run_dir / run.name
    split = items[0].split  # one trained model, measured on each split asked for: a file each
    result_path = folder / measured_file("result.json", split, constrained)
    if result_path.exists():
        return json.loads(result_path.read_text())
    pool = without_heldout(pool, [item.chain for item in items])  # every held-out question, measured or not
    items = measured_items(items, run.error_type)
    chains = control_chains(
        pool, run.train_records, seed=run.seed, positions=run.positions, error_types=run.error_types
    )
    records = training_records(chains, cue=run.cue, loss=run.loss, seed=run.seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model"
    whole = checkpoint_problem(weights) is None  # trained before a kill that came during evaluation
    if not whole:  # what a trained model was trained on stays as it was
        write_jsonl_atomic(folder / "train_records.jsonl", records)
    settings = replace(
        settings,
        method="full" if run.lora_rank is None else "lora",
        lora_rank=run.lora_rank or settings.lora_rank,
        learning_rate=run.learning_rate,
        epochs=run.epochs,
        seed=run.seed,
        adam_beta2=run.adam_beta2,
        loss_weighting=run.loss_weighting,
    )
    summary = (
        json.loads((weights / SUMMARY).read_text())
        if whole
        else train(model_dir, records, weights, settings, show_progress=show_progress)
    )
    trained = time.perf_counter()
    lm = local_lm(weights, max_batch_size=num_threads)
    try:
        predictions = evaluate_location(
            items,
            lm,
            folder / measured_file("predictions.jsonl", split, constrained),
            cue=run.cue,
            num_threads=num_threads,
            show_progress=show_progress,
            constrained=constrained,
        )
    finally:
        release(lm)
    measured = score(items, predictions)
    result = {
        **asdict(run),
        "name": run.name,
        "split": split,
        "constrained": constrained,
        "heldout_n": measured["n"],
        "correct": measured["correct"],
        "majority_baseline_correct": measured["majority_baseline_correct"],
        "last_step_baseline_correct": measured["last_step_baseline_correct"],
        "mcnemar_p": measured["mcnemar_p"],
        "better_baseline": measured["better_baseline"],
        "accuracy": measured["accuracy"],
        "parsed": measured["parsed"],
        "answers": measured["answers"],
        "records": len(records),
        "train_positions": dict(
            sorted(Counter("none" if c.mistake_index is None else c.mistake_index + 1 for c in chains).items(), key=str)
        ),
        "training": {
            k: summary.get(k)
            for k in ("steps", "first_loss", "last_loss", "wall_seconds", "seconds_per_step", "resumed_at_step")
        },
        "evaluation_seconds": time.perf_counter() - trained,
        "predictions": str(folder / measured_file("predictions.jsonl", split, constrained)),
    }
    write_json_atomic(result_path, result)
    return result


def measured_file(name: str, split: str, constrained: bool = False) -> str:
    """A run's file of one measurement: the test split's, unconstrained, under `name`; another split's
    with the split's name before the suffix ('result-validation.json'), a constrained one's with
    '-constrained' ('result-validation-constrained.json')."""
    tags = ("" if split == "test" else f"-{split}") + ("-constrained" if constrained else "")
    stem, dot, suffix = name.rpartition(".")  # the last dot: a run's name may hold one ("lr0.0001")
    return f"{stem}{tags}{dot}{suffix}" if dot else f"{name}{tags}"


def publish(result: dict[str, Any], items: list[SplitItem], results_path: Path) -> dict[str, Any]:
    """Record a finished run in `results_path` ({"runs": [...]}, one entry per run name, kept
    across invocations): its predictions copied beside it (<folder>/control/<run name>.jsonl, the
    path the entry names), its slices and its confusion table over the items it was measured on
    (`measured_items`). Returns the entry."""
    items = measured_items(items, result.get("error_type"))  # runs recorded before it was an option had none
    constrained = result.get("constrained", False)  # runs measured before it was an option were not
    name = f"{result['name']}.jsonl"
    predictions_path = results_path.parent / "control" / measured_file(name, result["split"], constrained)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result["predictions"], predictions_path)
    predictions = read_predictions(predictions_path)
    entry = {
        **result,
        "predictions": str(predictions_path),
        "slices": slices(items, predictions),
        "confusion": confusion(items, predictions),
    }
    recorded = json.loads(results_path.read_text())["runs"] if results_path.exists() else []
    same = (entry["name"], constrained)
    runs = [run for run in recorded if (run["name"], run.get("constrained", False)) != same] + [entry]
    write_json_atomic(
        results_path, {"runs": sorted(runs, key=lambda run: (run["name"], run.get("constrained", False)))}
    )
    return entry
