"""The generation-verification gap: is recognising a good recovery easier than writing one, and
does it stay so round after round?

A fixed verification set is made once, after round 0: chains reserved from the seed pool (no
model trains on them), corrupted by the injector, each recovered by round 0's student twice (its
greedy answer and one sampled), the oracle's verdict on each recovery. A weak student's recoveries
are nearly all wrong (the base SmolLM2-135M's are), so the chains are walked in growing
chunks until at least a quarter of the set's size is accepted and a quarter rejected (or the
chains run out); the set keeps up to half accepted, the rest rejected, in the walk's order. Every
round then scores:

- the frozen judge's verdicts on those recoveries, and the student's own weights as judge (the
  Judge program on the student's LM), each as balanced accuracy against the oracle;
- the student's own recovery accuracy on the same chains (greedy, told where the error is).

The gap is the student's judging minus its recovering; the seed's "you stop recognising better
outputs" is that line falling.

    RUN_DIR/verification.jsonl                        every recovery made, with the oracle's verdict
    RUN_DIR/verification-set.json                     the set: the keys of the recoveries chosen, in order
    RUN_DIR/verification-frozen.jsonl                 the frozen judge's verdicts (the same every round)
    RUN_DIR/judge/training_fit.json                   the frozen judge's verdicts on its own training examples
    RUN_DIR/round-N/verification/self_judge.jsonl     the student's verdicts
    RUN_DIR/round-N/verification/recoveries.jsonl     the student's own recoveries, by the oracle
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy

from misstep.data.records import Chain
from misstep.data.runfiles import JsonlLog, write_json_atomic
from misstep.data.tables import read_jsonl
from misstep.metrics.stats import balanced_accuracy, rate
from misstep.optimize.demos import attach_demos
from misstep.optimize.judge_data import checked_recovery, injected_pairs
from misstep.programs import Judge, SelfCorrector
from misstep.programs.answer_format import AnswerAdapter
from misstep.programs.parallel import map_logged

logger = logging.getLogger(__name__)


def build_set(
    chains: list[Chain],
    student: SelfCorrector,
    path: Path,
    *,
    size: int,
    temperature: float,
    seed: int,
    num_threads: int = 8,
    constrained: bool = True,
) -> list[dict[str, Any]]:
    """The verification set of up to `size` recoveries (resumable in `path`, which keeps every
    recovery made): for injected chains in turn, `student`'s greedy recovery and one sampled at
    `temperature`, with the oracle's verdict, until a quarter of `size` are accepted and a quarter
    rejected; up to half of the set accepted, the rest rejected (parsed ones only). The keys chosen
    are kept beside `path` (-set.json) and a rerun takes the set from there, so every round is scored
    on the same recoveries whatever the options of the rerun."""
    chosen_path = _set_path(path)
    if chosen_path.exists():
        return kept_set(path)
    lm = student.predictors()[0].lm
    sampler = SelfCorrector()
    sampler.recover.demos = list(student.recover.demos)
    sampler.set_lm(lm.copy(temperature=temperature, seed=seed))
    work = [(valid, bad, how) for valid, bad in injected_pairs(chains, k=len(chains), seed=seed) for how in (0, 1)]

    def recover(item: tuple[Chain, Chain, int]) -> dict[str, Any]:
        valid, bad, how = item
        corrector = student if how == 0 else sampler
        return {
            "key": f"{bad.source_id}#{how}",
            "question": bad.question,
            "valid_steps": list(valid.steps),
            "invalid_steps": list(bad.steps),
            "first_error": bad.mistake_index,
            "reference_answer": valid.answer,
            **checked_recovery(corrector, bad.question, bad.steps, bad.mistake_index, valid.answer),
        }

    walked, records = 0, []
    while walked < len(work) and not found_enough(records, size):  # chunks of size, 2 x size, 4 x size, ...
        walked = min(len(work), max(2 * walked, size))
        records = map_logged(
            recover,
            work[:walked],
            path,
            lambda w: f"{w[1].source_id}#{w[2]}",
            lm=lm,
            adapter=AnswerAdapter(constrained),
            num_threads=num_threads,
            description=f"verification set: recoveries (up to {walked})",
        )
    chosen = balanced_set(records, size)
    write_json_atomic(chosen_path, {"size": size, "keys": [r["key"] for r in chosen]})
    return chosen


def _set_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}-set.json")


def kept_set(path: Path) -> list[dict[str, Any]]:
    """The set a run chose (its keys beside `path`, in -set.json), its records from `path`."""
    chosen_path = _set_path(path)
    keys = json.loads(chosen_path.read_text(encoding="utf-8"))["keys"]
    with JsonlLog(path) as log:
        by_key = {record["key"]: record for record in log.records}
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"{chosen_path}: {len(missing)} of its keys have no recovery in {path} (first: {missing[0]})")
    return [by_key[k] for k in keys]


def found_enough(records: list[dict[str, Any]], size: int) -> bool:
    """Whether the parsed `records` hold a quarter of `size` accepted recoveries and a quarter rejected."""
    verdicts = [r["recovery_ok"] for r in records if r["parsed"]]
    return min(verdicts.count(True), verdicts.count(False)) >= size // 4


def balanced_set(records: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Up to `size` parsed records: the accepted first, up to half of `size`, then the rejected,
    each in the order they were made."""
    parsed = [r for r in records if r["parsed"]]
    accepted = [r for r in parsed if r["recovery_ok"]][: size // 2]
    return accepted + [r for r in parsed if not r["recovery_ok"]][: size - len(accepted)]


def verdicts(
    items: list[dict[str, Any]], judge: Judge, path: Path, *, num_threads: int = 8, constrained: bool = True
) -> dict[str, bool | None]:
    """`judge`'s verdict on each recovery of the set (None: unparsed), kept in `path`."""

    def judged(item: dict[str, Any]) -> dict[str, Any]:
        out = judge(
            question=item["question"],
            valid_steps=item["valid_steps"],
            invalid_steps=item["invalid_steps"],
            recovered_steps=item["recovered_steps"],
            final_answer=item["final_answer"],
            first_error=item["first_error"],
        )
        ok = out.judge.ok
        return {"key": item["key"], "verdict": bool(out.judge.outputs["recovery_succeeded"]) if ok else None}

    lm = judge.predictors()[0].lm
    return _logged(items, judged, lambda i: i["key"], lm, path, num_threads, constrained, "verification: judging")


def own_recoveries(
    items: list[dict[str, Any]], student: SelfCorrector, path: Path, *, num_threads: int = 8, constrained: bool = True
) -> dict[str, bool | None]:
    """Whether `student` (greedy) recovers each chain of the set, by the oracle (None: unparsed)."""
    chains = {_chain_key(item): item for item in items}  # the set holds two recoveries a chain

    def recovered(item: dict[str, Any]) -> dict[str, Any]:
        checked = checked_recovery(
            student, item["question"], tuple(item["invalid_steps"]), item["first_error"], item["reference_answer"]
        )
        return {"key": _chain_key(item), "verdict": checked["recovery_ok"] if checked["parsed"] else None}

    lm = student.predictors()[0].lm
    chosen = list(chains.values())
    return _logged(chosen, recovered, _chain_key, lm, path, num_threads, constrained, "verification: recovering")


def _chain_key(item: dict[str, Any]) -> str:
    return item["key"].rsplit("#", 1)[0]


def _logged(
    items: list[dict[str, Any]],
    run: Callable[[dict[str, Any]], dict[str, Any]],
    key_of: Callable[[dict[str, Any]], str],
    lm: dspy.LM,
    path: Path,
    num_threads: int,
    constrained: bool,
    description: str,
) -> dict[str, bool | None]:
    """`run` on each of `items` not yet in `path` (a JSONL of {"key", "verdict"}); every verdict by key."""
    adapter = AnswerAdapter(constrained)
    threads = dict(lm=lm, adapter=adapter, num_threads=num_threads, description=description)
    return {r["key"]: r["verdict"] for r in map_logged(run, items, path, key_of, **threads)}


def judged(items: list[dict[str, Any]], verdicts: dict[str, bool | None]) -> dict[str, Any]:
    """`verdicts` (by key) on the set's `items` against the oracle: `balanced_accuracy`'s figures,
    an unparsed verdict counted as wrong (the verdict the oracle does not give)."""
    truth = [item["recovery_ok"] for item in items]
    said = [verdicts.get(item["key"]) for item in items]
    return balanced_accuracy([s if s is not None else not t for s, t in zip(said, truth)], truth)


def gap_row(
    items: list[dict[str, Any]],
    frozen: dict[str, bool | None],
    own_judging: dict[str, bool | None],
    own_recovering: dict[str, bool | None],
) -> dict[str, Any]:
    """A round's line of the gap: each judge's balanced accuracy against the oracle (`judged`), the
    student's recovery accuracy on the same chains, and the difference."""
    truth = [item["recovery_ok"] for item in items]

    recovering = rate(bool(v) for v in own_recovering.values())
    judging = judged(items, own_judging)["value"]
    return {
        "n": len(items),
        "accepted": sum(truth),
        "rejected": len(truth) - sum(truth),
        "judge_balanced_accuracy": judged(items, frozen)["value"],
        "self_judge_balanced_accuracy": judging,
        "recovery": recovering.to_dict(),
        "gap": None if judging is None or not recovering.n else judging - recovering.value,
    }


VERDICT = re.compile(r"\[\[ ## recovery_succeeded ## \]\]\s*(\S+)")


def training_fit(lm: dspy.LM, weights: Path) -> dict[str, Any]:
    """A judge's positive control: its greedy verdict on the prompt of each of its own training
    records (`weights`/train_data.jsonl) that teaches a verdict (the judge's, among the other stages'
    ground truth), against the verdict taught. A judge that gives every one the same verdict has not
    learnt what it was taught, and its verdicts on anything else say nothing (logged as a warning)."""
    records = [record for _, record in read_jsonl(weights / "train_data.jsonl")]
    taught = [r for r in records if VERDICT.search(r["messages"][-1]["content"])]
    counts: Counter[str] = Counter()
    right = 0
    for record in taught:
        want = VERDICT.search(record["messages"][-1]["content"]).group(1)
        found = VERDICT.search(lm(messages=record["messages"][:-1], max_tokens=32, temperature=0.0)[0] or "")
        said = found.group(1) if found else "unparsed"
        counts[said] += 1
        right += said == want
    if len(counts) == 1 and len(taught) > 1:
        logger.warning("the judge says %s to all %d of its own training examples", next(iter(counts)), len(taught))
    return {"n": len(taught), "correct": right, "verdicts": dict(counts)}


def student_as_judge(student: SelfCorrector, demos: dict[str, list[dspy.Example]] | None = None) -> Judge:
    """Stages 5-6 on the student's own weights, with `demos` in their prompts where given."""
    judge = attach_demos(Judge(), demos or {})
    judge.set_lm(student.predictors()[0].lm)
    return judge


class GapMeter:
    """The set and the frozen judge's verdicts, made once; `row(student, folder)` scores a round."""

    def __init__(
        self,
        items: list[dict[str, Any]],
        frozen: dict[str, bool | None],
        judge_demos: dict[str, list[dspy.Example]],
        *,
        num_threads: int = 8,
        constrained: bool = True,
    ):
        self.items, self.frozen, self.judge_demos = items, frozen, judge_demos
        self.options = {"num_threads": num_threads, "constrained": constrained}

    def row(self, student: SelfCorrector, folder: Path) -> dict[str, Any]:
        """The student's weights as judge (with `judge_demos` in its prompts) and as recoverer."""
        own_judge = student_as_judge(student, self.judge_demos)
        judging = verdicts(self.items, own_judge, folder / "verification" / "self_judge.jsonl", **self.options)
        recovering = own_recoveries(self.items, student, folder / "verification" / "recoveries.jsonl", **self.options)
        return gap_row(self.items, self.frozen, judging, recovering)
