"""The self-improvement loop on the tiny model: two rounds end to end, resume after an injected
failure, no held-out leakage, and active selection's choice."""

import gc
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from misstep.data.records import Scenario
from misstep.data.splits import normalize_question
from misstep.lm import EmbeddedEngine, local_lm
from misstep.lm.provider import LocalProvider
from misstep.lm.training import TrainSettings
from misstep.metrics.evaluation import injected_gsm8k
from misstep.metrics.health import StopRule
from misstep.metrics.stats import Rate
from misstep.optimize.rounds import LoopSettings, run_loop
from misstep.optimize.sources import select_seeds


def _open_engines(run_dir):
    """The in-process engines still holding weights from under `run_dir`."""
    return {
        id(o)
        for o in gc.get_objects()
        if type(o) is EmbeddedEngine and o.model is not None and run_dir in o.model_dir.parents
    }


def _settings(**overrides):
    values = dict(
        rounds=2,
        seed_chains=3,
        ground_truth=2,
        demos=1,
        num_threads=4,
        tuning_trials=5,
        verification_chains=3,
        error_types=["arithmetic_slip", "wrong_operand", "wrong_operation"],
    )
    return LoopSettings(**{**values, **overrides})


# Three held-out items are too few for the stop rule to mean anything: a test of the rounds' mechanics
# runs them all (a tiny model's answers are often one answer, which the rule calls collapse).
RUNS_ALL_ROUNDS = StopRule(patience=10, max_top_share=1.0, min_diversity_ratio=0.0)


class FailingOnce(LocalProvider):
    """The injected fault: the third fine-tune dies, as a killed process would mid-round."""

    calls = 0

    def finetune(self, *args, **kwargs):
        FailingOnce.calls += 1
        if FailingOnce.calls == 3:  # the judge's and the student's warm-ups pass; round 1's compile dies
            raise RuntimeError("injected failure in round 1's compile")
        return super().finetune(*args, **kwargs)


@pytest.fixture()
def loop_parts(tmp_path, tiny_model_dir, gsm8k_train, gsm8k_test):
    train = TrainSettings(method="full", epochs=1.0, learning_rate=1e-3, batch_size=4, max_length=512)
    # Held-out questions with a character JSON escapes (the training data is written ASCII-escaped).
    test_chains = [replace(c, question=c.question + " (in €)") for c in gsm8k_test[:12]]
    heldout = {"gsm8k": injected_gsm8k(test_chains[:6], 3)}
    validation = {"gsm8k": injected_gsm8k(test_chains[6:], 3)}
    # The same questions are slipped into the training data first, recased and respaced: demos and
    # ground truth are drawn from the front of the pool, so without the held-out filter they leak.
    disguised = [replace(c, question="  " + c.question.upper().replace(" ", "  ")) for c in test_chains]
    train_chains = disguised + gsm8k_train
    judge_lm = local_lm(tiny_model_dir, max_tokens=16, cache=False)
    return train, heldout, validation, train_chains, judge_lm


def test_two_rounds_end_to_end_resume_after_a_failure_and_no_leak(tmp_path, tiny_model_dir, loop_parts):
    train, heldout, validation, train_chains, judge_lm = loop_parts
    run_dir = tmp_path / "loop"

    def run(provider, judge_epochs=2):
        return run_loop(
            train_chains,
            heldout,
            provider=provider,
            judge_lm=judge_lm,
            settings=_settings(
                locate_warm_up=4,
                recovery_items=2,
                judge_epochs=judge_epochs,
                judge_max_length=400,
                judge_gradient_checkpointing=True,
                stop=RUNS_ALL_ROUNDS,
            ),
            run_dir=run_dir,
            validation=validation,
        )

    failing = FailingOnce(tiny_model_dir, run_dir / "checkpoints", train, show_progress=False)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(failing)
    assert (run_dir / "round-0" / "round.json").exists() and not (run_dir / "round-1" / "program.json").exists()
    scenarios_before = (run_dir / "round-1" / "scenarios.jsonl").read_text()
    selection_before = (run_dir / "round-1" / "selection.json").read_text()

    provider = LocalProvider(tiny_model_dir, run_dir / "checkpoints", train, show_progress=False)
    open_before = _open_engines(run_dir)
    history = run(provider)
    # Each round's model is let go once the next is compiled, the judge and the last student when
    # the loop returns: nothing it loaded stays in memory.
    assert not _open_engines(run_dir) - open_before

    # Resumed: round 0 was not trained again and round 1's finished steps were not redone.
    assert (run_dir / "round-1" / "scenarios.jsonl").read_text() == scenarios_before
    assert (run_dir / "round-1" / "selection.json").read_text() == selection_before
    assert len(list((run_dir / "checkpoints").glob("compile-*"))) == 4  # judge, warm-up, round 1, round 2
    judge_report = json.loads((run_dir / "judge" / "compile_report.json").read_text())
    assert judge_report["training"]["base_model"] == str(tiny_model_dir)  # the judge never trains on the student
    # The judge trains for its own epochs and record length (judge_*), the student with the compile's.
    warm_report = json.loads((run_dir / "round-0" / "compile_report.json").read_text())
    assert judge_report["training"]["settings"]["epochs"] == 2 and warm_report["training"]["settings"]["epochs"] == 1
    assert judge_report["training"]["settings"]["max_length"] == 400
    assert warm_report["training"]["settings"]["max_length"] == train.max_length == 512
    judge_settings, warm_settings = judge_report["training"]["settings"], warm_report["training"]["settings"]
    assert judge_settings["gradient_checkpointing"] and not warm_settings["gradient_checkpointing"]
    assert judge_report["training"]["steps"] == 2 * math.ceil(judge_report["training"]["records"] / train.batch_size)
    # Its ground truth: a success and a failure per chain, failures the base model wrote where it wrote
    # one (each of its recoveries kept), confidence in levels.
    judge_truth = json.loads((run_dir / "judge" / "judge_truth.json").read_text())
    written = (run_dir / "judge" / "written_recoveries.jsonl").read_text().splitlines()
    assert judge_truth["by_kind"]["success"] == len(written) == 2  # ground_truth=2 chains
    assert sum(judge_truth["by_kind"].values()) == 4 and len(judge_truth["confidence_levels"]) >= 2
    # Its positive control: its verdict on each of its own 4 training examples, against the one taught.
    fit = json.loads((run_dir / "judge" / "training_fit.json").read_text())
    assert fit["n"] == 4 and sum(fit["verdicts"].values()) == 4 and 0 <= fit["correct"] <= 4
    assert [row["round"] for row in history] == [0, 1, 2]
    for r in (1, 2):
        folder = run_dir / f"round-{r}"
        for name in (
            "selection.json",
            "scenarios.jsonl",
            "tuning.json",
            "kept.jsonl",
            "program.json",
            "compile_report.json",
            "round.json",
        ):
            assert (folder / name).exists(), f"round {r}: {name}"
        row = json.loads((folder / "round.json").read_text())
        assert row["heldout"]["gsm8k"]["gsm8k"]["location_accuracy"]["n"] == 3
        assert row["heldout"]["gsm8k"]["gsm8k"]["recovery_success"]["n"] == 2  # recovery_items
        assert row["validation"]["gsm8k"]["gsm8k"]["location_accuracy"]["n"] == 3 and row["chosen_on"] == "validation"
        assert (
            "recovery_success" not in row["validation"]["gsm8k"]["gsm8k"]
            or not row["validation"]["gsm8k"]["gsm8k"]["recovery_success"]["n"]
        )  # only the reported set recovers
        for floor in ("majority_baseline", "last_step_baseline"):
            assert row["heldout"]["gsm8k"]["gsm8k"][floor]["n"] == 3
        assert 0 < row["answers"]["top_share"] <= 1 and row["answers"]["n"] == 3
        assert row["verdict"]["reason"] in ("continue", "plateau", "collapse")
        # The gap: the same recoveries judged each round, beside the student's own recovering.
        gap = row["verification"]
        assert gap["n"] == gap["accepted"] + gap["rejected"] and 0 < gap["n"] <= 6
        assert gap["recovery"]["n"] == 3 and (run_dir / f"round-{r}" / "verification" / "self_judge.jsonl").exists()
        if gap["accepted"] and gap["rejected"]:
            assert 0 <= gap["self_judge_balanced_accuracy"] <= 1 and gap["gap"] is not None
        if r == 2:  # round 2 ran whole in this process: every step's time is recorded
            assert set(row["seconds"]) == {"scenarios", "tuning", "compile", "heldout", "verification"}
            assert all(v >= 0 for v in row["seconds"].values()) and row["seconds"]["compile"] > 0
        report = json.loads((folder / "compile_report.json").read_text())
        assert report["training"]["base_model"].endswith(history[r - 1]["model"].split("/")[-1].rsplit("-", 1)[0])
        # The writer's ground truth trains the same weights in every compile, so its chains stay checkable.
        records = [json.loads(line) for line in (Path(report["model_dir"]) / "train_data.jsonl").open()]
        answers = [r["messages"][-1]["content"] for r in records]
        assert sum("[[ ## mistake_description ## ]]" in a for a in answers) == 3 * 2  # describe
        assert sum("[[ ## invalid_chain ## ]]" in a for a in answers) == 3 * 2  # corrupt
    warm = json.loads((run_dir / "round-0" / "compile_report.json").read_text())
    # 3 error types x (describe, corrupt) x 2 examples, and 4 stage-3 records on the control's data
    assert warm["warm_up"]["of_which_extra"] == 3 * 2 * 2 + 4
    assert json.loads((run_dir / "loop.json").read_text())["writer_ground_truth"] == {
        "arithmetic_slip": 2,
        "wrong_operand": 2,
        "wrong_operation": 2,
    }
    best = json.loads((run_dir / "best.json").read_text())
    assert best["round"] in (0, 1, 2) and best["program"].endswith("program.json")

    # Nothing held out (test or validation) reached any training data, nor any scenario.
    held = {normalize_question(c.question) for sets in (heldout, validation) for c in sets["gsm8k"]}
    assert_no_question_in(held, run_dir / "checkpoints")
    for r in (1, 2):
        for line in (run_dir / f"round-{r}" / "scenarios.jsonl").read_text().splitlines():
            assert normalize_question(json.loads(line)["chain"]["question"]) not in held

    # Resumed with a judge trained differently: refused before anything is written, not handed the old judge.
    loop_json = (run_dir / "loop.json").read_text()
    with pytest.raises(
        ValueError, match=r"judge/program.json: this run's judge was trained with judge_epochs = 2 \(asked: 3\)"
    ):
        run(provider, judge_epochs=3)
    assert (run_dir / "loop.json").read_text() == loop_json


def test_a_loop_restarting_from_round_0_carried_without_its_weights_makes_only_the_ones_it_uses(
    tmp_path, tiny_model_dir, loop_parts
):
    train, heldout, validation, train_chains, judge_lm = loop_parts
    run_dir = tmp_path / "restart"

    def run(rounds, compile_from="round-0"):
        provider = LocalProvider(tiny_model_dir, run_dir / "checkpoints", train, show_progress=False)
        settings = _settings(rounds=rounds, compile_from=compile_from, stop=RUNS_ALL_ROUNDS)
        return run_loop(
            train_chains,
            heldout,
            provider=provider,
            judge_lm=judge_lm,
            settings=settings,
            run_dir=run_dir,
            validation=validation,
        )

    def weights_of(step):
        return Path(json.loads((run_dir / step / "program.json").read_text())["model_dir"])

    def trained_from(step):
        return json.loads((run_dir / step / "compile_report.json").read_text())["training"]["base_model"]

    run(2)
    assert trained_from("round-1") == trained_from("round-2") == str(weights_of("round-0"))
    for weights in run_dir.glob("checkpoints/*/model.safetensors"):
        weights.unlink()  # carried to another machine without them

    run(2)  # resumed: no model is asked anything, so none is made
    assert not list(run_dir.glob("checkpoints/*/model.safetensors"))

    history = run(3)
    # Round 3 writes with round 2's model, the judge scores what it wrote (where a recovery parsed), and
    # round 0's weights are trained: those are made again, no other. (The tiny model's rounds keep
    # nothing, so rounds 1 to 3 train on the same records and share one checkpoint.)
    made = {path.parent for path in run_dir.glob("checkpoints/*/train_replayed.json")}
    assert (
        {weights_of("round-0"), weights_of("round-2")}
        <= made
        <= {
            weights_of("judge"),
            weights_of("round-0"),
            weights_of("round-2"),
        }
    )
    assert all(json.loads((folder / "train_replayed.json").read_text())["same_weights"] for folder in made)
    assert trained_from("round-3") == str(weights_of("round-0")) and [row["round"] for row in history] == [0, 1, 2, 3]

    with pytest.raises(ValueError, match=r"round-2/compile_report.json: this round was compiled from .* compile_from"):
        run(3, compile_from="previous")  # not resumed as if it had been trained as asked


def test_arms_start_from_one_round_0_write_from_the_same_chains_and_compare_item_by_item(
    tmp_path, tiny_model_dir, loop_parts
):
    from misstep.optimize.config import RunConfig
    from misstep.optimize.run import arm_variants, run_arms

    train, heldout, validation, train_chains, _ = loop_parts
    run_dir, arms = tmp_path / "arms", ["judge", "all"]
    config = RunConfig(model=str(tiny_model_dir), train=train, loop=_settings(rounds=1))

    from misstep.data.splits import load_split, split_path

    bbm = [item.chain for item in load_split(split_path("word_sorting", "test"))[:4]]

    def run():
        return run_arms(
            config,
            tiny_model_dir,
            train_chains,
            heldout,
            arms=arm_variants(config.loop, arms),
            run_dir=run_dir,
            validation=validation,
            at_best={"bbm-word_sorting": bbm},
        )

    histories, report = run()
    # One judge and one round 0 for both arms (a compile writes its report where it ran), then a
    # compile per arm (arms that kept the same examples share the checkpoint those make).
    assert (run_dir / "judge" / "compile_report.json").exists()
    assert (run_dir / "round-0" / "compile_report.json").exists()
    checkpoints = sorted((run_dir / "checkpoints").glob("compile-*"))
    round_0 = json.loads((run_dir / "round-0" / "round.json").read_text())
    for arm in arms:
        folder = run_dir / f"arm-{arm}"
        assert not (folder / "round-0").exists() and not (folder / "judge").exists()
        assert histories[arm][0] == round_0 and [row["round"] for row in histories[arm]] == [0, 1]
        compiled = json.loads((folder / "round-1" / "compile_report.json").read_text())
        assert compiled["training"]["base_model"].endswith(round_0["model"].split("/")[-1].rsplit("-", 1)[0])
        assert (folder / "report.md").exists()
        for record in map(json.loads, (folder / "round-1" / "kept.jsonl").read_text().splitlines()):
            taught = record["kept_because"]["taught"]
            assert record["kept_because"]["arm"] == arm and (taught["location_by"] or taught["recovery_by"]) == arm
            assert not record["oracle"].get("writer_failed")  # a copied chain teaches nothing
    seeds = [json.loads((run_dir / f"arm-{arm}" / "round-1" / "selection.json").read_text())["seeds"] for arm in arms]
    assert seeds[0] == seeds[1]  # every arm writes from the same chains

    comparison = json.loads((run_dir / "arms.json").read_text())
    assert set(comparison["arms"]) == set(arms) and report == run_dir / "arms.md"
    for rows in comparison["arms"].values():
        assert [row["round"] for row in rows] == [0, 1] and rows[0]["mcnemar_p_vs_round0"] is None
        assert rows[1]["n"] == 3 and 0 <= rows[1]["mcnemar_p_vs_round0"] <= 1
        assert Path(rows[1]["predictions"]).exists()
        assert rows[1]["floors"] == rows[0]["floors"] and 0 <= rows[1]["floors"]["majority"] <= 3
        assert {"compile", "heldout"} <= set(rows[1]["seconds"]) and "warm_up" in rows[0]["seconds"]
    floors = comparison["arms"]["judge"][0]["floors"]
    written = report.read_text()
    assert f"majority label {floors['majority']}, always the last step {floors['last_step']}" in written
    for rows in comparison["arms"].values():  # each rate with its interval and n
        assert str(Rate(rows[1]["location_correct"], rows[1]["n"])) in written
        assert f"({rows[1]['recovery_correct']}/{rows[1]['recovery_n']})" in written
    assert comparison["pairs"]["judge vs all"]["n"] == 3
    # BIG-Bench Mistake at round 0 and at each arm's best round only, paired against round 0.
    at_best = comparison["at_best"]["bbm-word_sorting"]
    assert at_best["round 0"]["n"] == 4
    measured = {p.parent.parent.parent for p in run_dir.rglob("at-best/*/predictions.jsonl")}
    best_folders = {run_dir / "round-0"}
    for arm in arms:
        best = comparison["arms"][arm][-1]["best_round"]
        assert at_best[arm]["round"] == best and at_best[arm]["n"] == 4
        assert (at_best[arm]["mcnemar_p_vs_round0"] is None) == (best == 0)
        best_folders.add(run_dir / "round-0" if best == 0 else run_dir / f"arm-{arm}" / f"round-{best}")
    assert measured == best_folders  # no other round measured

    run()  # resumed: nothing is trained again
    assert sorted((run_dir / "checkpoints").glob("compile-*")) == checkpoints
    assert not _open_engines(run_dir)  # no arm's judge or students left loaded (one each per arm and round)


def test_a_self_judging_student_learns_to_judge_and_judges_its_own_scenarios(tmp_path, tiny_model_dir, loop_parts):
    train, heldout, validation, train_chains, judge_lm = loop_parts
    run_dir = tmp_path / "self-judge"
    provider = LocalProvider(tiny_model_dir, run_dir / "checkpoints", train, show_progress=False)
    settings = _settings(rounds=1, self_judge=True)
    history = run_loop(train_chains, heldout, provider=provider, judge_lm=judge_lm, settings=settings, run_dir=run_dir)
    assert [row["round"] for row in history] == [0, 1]
    for folder in ("round-0", "round-1"):  # the warm-up and the compile both teach the student to judge
        report = json.loads((run_dir / folder / "compile_report.json").read_text())
        answers = [
            json.loads(line)["messages"][-1]["content"] for line in open(Path(report["model_dir"]) / "train_data.jsonl")
        ]
        judged = [a for a in answers if "[[ ## recovery_succeeded ## ]]" in a]
        assert len(judged) == 2 * 2  # a success and a failure for each of ground_truth=2 chains
    # Round 1's scenarios were judged on the student's weights (round 0's), not the frozen judge's.
    assert history[1]["judged_by"] == history[0]["model"]
    assert history[1]["verification"]["n"] > 0


def test_candidates_sample_stages_3_to_6_again_on_the_written_chain_and_resume_one_by_one(
    tmp_path, tiny_engine, gsm8k_train
):
    from misstep.data.records import StageResult
    from misstep.metrics.checks import check_scenario
    from misstep.metrics.injector import inject
    from misstep.optimize.sources import write_scenarios
    from misstep.programs import Judge, SelfCorrectionCycle, SelfCorrector

    student, judge = SelfCorrector(), Judge()
    lm = local_lm(engine=tiny_engine, max_tokens=160, cache=False)
    student.set_lm(lm)
    judge.set_lm(lm)
    chains = gsm8k_train[:3]
    folder = tmp_path / "round-1"
    folder.mkdir()
    # Random weights write no chain, so each chain's own pass (candidate 0) is a chain the injector
    # wrote, corrected by the real student; the run resumes from it and samples the candidates.
    with (folder / "scenarios.jsonl").open("w") as log:
        for chain in chains:
            bad = inject(chain, "arithmetic_slip", seed=0)
            step = bad.mistake_index + 1
            scenario = Scenario(
                chain,
                "arithmetic_slip",
                stages={
                    "describe": StageResult(True, {"mistake_step": step, "mistake_description": "a slip"}),
                    "corrupt": StageResult(True, {"invalid_chain": "\n".join(bad.steps), "invalid_answer": "?"}),
                },
                invalid_steps=bad.steps,
            )
            scenario = SelfCorrectionCycle(corrector=student, judge=judge).correct(scenario)
            scenario.oracle = check_scenario(scenario)
            log.write(json.dumps(scenario.to_dict()) + "\n")
    greedy_lines = (folder / "scenarios.jsonl").read_text().splitlines()
    settings = _settings(candidates=3, candidate_temperature=1.0)

    def write():
        return write_scenarios([(c, "arithmetic_slip") for c in chains], student, judge, {}, folder, settings)

    scenarios = write()
    lines = (folder / "scenarios.jsonl").read_text().splitlines()
    assert lines[: len(chains)] == greedy_lines and len(scenarios) == 3 * len(chains)
    # The file has every greedy pass first, then candidates as threads finish; the list is the work's.
    in_work_order = [(c.source_id, k) for c in chains for k in range(3)]
    assert [(s.chain.source_id, s.candidate) for s in scenarios] == in_work_order
    by_chain = {}
    for s in scenarios:
        by_chain.setdefault(s.chain.source_id, {})[s.candidate] = s
    for candidates in by_chain.values():
        greedy = candidates[0]
        assert set(candidates) == {0, 1, 2}
        for c in (1, 2):
            assert candidates[c].invalid_steps == greedy.invalid_steps and candidates[c].key.endswith(f"#{c}")
            assert candidates[c].stages["corrupt"] == greedy.stages["corrupt"]  # the same written chain
            assert candidates[c].oracle["invalid_first_error"] == greedy.oracle["invalid_first_error"]

    # Sampled at the setting's temperature, each candidate with a seed of its own (the engine's
    # sampling is tested in test_engine), and the greedy pass not.
    for candidates in by_chain.values():
        assert not candidates[0].sampling
        assert [candidates[c].sampling["temperature"] for c in (1, 2)] == [1.0, 1.0]
        assert candidates[1].sampling["seed"] != candidates[2].sampling["seed"]

    # Killed after a chain's first candidate: the rerun writes only the missing one.
    last = json.loads(lines[-1])
    (folder / "scenarios.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = write()
    after = (folder / "scenarios.jsonl").read_text().splitlines()
    assert after[:-1] == lines[:-1] and len(again) == len(scenarios)
    assert [(s.chain.source_id, s.candidate) for s in again] == in_work_order
    assert (json.loads(after[-1])["source_id"], json.loads(after[-1])["candidate"]) == (
        last["source_id"],
        last["candidate"],
    )


def assert_no_question_in(questions: set[str], checkpoints: Path) -> None:
    """No training record under `checkpoints` shows any of `questions` (normalised), read as JSON
    rather than as its ASCII-escaped text. Fails on an empty folder, which would prove nothing."""
    files = list(checkpoints.glob("compile-*/train_data.jsonl"))
    assert files, f"no training data under {checkpoints}"
    for data in files:
        for line in data.read_text().splitlines():
            for message in json.loads(line)["messages"]:
                text = normalize_question(message["content"])
                assert not any(q in text for q in questions), (data, message["content"][:200])


def test_active_selection_prefers_the_error_types_that_failed(gsm8k_train):
    previous = []
    for n, chain in enumerate(gsm8k_train[:20]):
        error_type = ("arithmetic_slip", "wrong_operand")[n % 2]
        solved = error_type == "arithmetic_slip"  # the model always recovers slips, never wrong operands
        previous.append(Scenario(chain, error_type, oracle={"location_ok": solved, "recovery_ok": solved}))
    settings = _settings(seed_chains=40, error_types=["arithmetic_slip", "wrong_operand"], exploration=0.2)
    chosen = select_seeds(gsm8k_train, previous, settings, random.Random(0), round_index=2)
    assert chosen["weights"]["wrong_operand"] > 0.8 and chosen["mix"]["wrong_operand"] > chosen["mix"].get(
        "arithmetic_slip", 0
    )
    assert chosen["revisited"] > 0 and "failure rate" in chosen["reason"]
    failed = {p.chain.source_id for p in previous if p.error_type == "wrong_operand"}
    revisited = [(s, e) for s, e in chosen["seeds"] if s in failed]
    assert revisited and all(e == "arithmetic_slip" for _, e in revisited)  # under another error type

    off = select_seeds(
        gsm8k_train,
        previous,
        _settings(seed_chains=40, active_selection=False, error_types=["arithmetic_slip", "wrong_operand"]),
        random.Random(0),
        round_index=2,
    )
    assert off["weights"] == {"arithmetic_slip": 0.5, "wrong_operand": 0.5} and off["revisited"] == 0
    assert "off" in off["reason"]


def test_rounds_are_chosen_on_the_validation_split_not_the_reported_one():
    from misstep.optimize.rounds import _answers, _primary

    def metrics(k, share):
        return {"gsm8k": {"gsm8k": {"location_accuracy": {"k": k, "n": 100}, "answers": {"top_share": share}}}}

    row = {"heldout": metrics(90, 0.2), "validation": metrics(30, 0.7), "chosen_on": "validation"}
    assert _primary(row, "location_accuracy").k == 30 and _answers(row)["top_share"] == 0.7
    legacy = {"heldout": metrics(90, 0.2)}  # a round.json from before validation splits
    assert _primary(legacy, "location_accuracy").k == 90


def test_a_finished_round_resumed_under_a_new_stop_rule_is_judged_by_it(tmp_path):
    from misstep.optimize.rounds import _finish_round

    def row(r, k, share):
        metrics = {"location_accuracy": {"k": k, "n": 180}, "answers": {"top_share": share}}
        return {
            "round": r,
            "validation": {"gsm8k": {"gsm8k": metrics}},
            "chosen_on": "validation",
            "answers": {"top_share": share},  # as round.json carries it
        }

    # Round 2 of an arm that answers one step for 96% of the items, up from 82%: a collapse, which
    # stopped the arm when the round was finished.
    history = [row(0, 58, 0.96), row(1, 49, 0.82)]
    folder = tmp_path / "round-2"
    folder.mkdir()
    finished = row(2, 58, 0.96)
    finished["verdict"] = {
        "stop": True,
        "reason": "collapse",
        "best_round": 0,
        "detail": "round 2 gives one stage-3 answer to 96% of the held-out items (above 60%, and up from 82%)",
    }
    (folder / "round.json").write_text(json.dumps(finished))

    stopping = _settings(stop=StopRule(patience=3))  # the rule it was finished under: nothing changes
    again = _finish_round(2, folder, None, {}, {}, stopping, history)
    assert again == finished and json.loads((folder / "round.json").read_text()) == finished

    budget = _settings(stop=StopRule(patience=3, fixed_budget=True))  # resumed at a fixed budget: it goes on
    resumed = _finish_round(2, folder, None, {}, {}, budget, history)
    assert not resumed["verdict"]["stop"] and resumed["verdict"]["reason"] == "collapse"
    assert resumed["verdicts_before"] == [finished["verdict"]]  # the verdict it was finished with is kept
    assert json.loads((folder / "round.json").read_text()) == resumed
    assert {k: v for k, v in resumed.items() if k not in ("verdict", "verdicts_before")} == {
        k: v for k, v in finished.items() if k != "verdict"
    }  # its measurements are untouched


@pytest.mark.parametrize("selection", ["curriculum", "uniform"])
def test_procedural_seeds_at_the_chosen_level_never_a_held_out_one_and_resumed_the_same(
    tmp_path, tiny_model_dir, loop_parts, selection
):
    """Two rounds whose seeds are procedural problems: the curriculum probes every level each round
    and moves at most one level; uniform draws levels; selection.json keeps the chains and why; a
    rerun reads the same choice back."""
    from dataclasses import asdict

    from misstep.data.procedural import LADDER, difficulty_of
    from misstep.data.splits import load_split, split_path
    from misstep.optimize.frontier import heldout_questions

    train, heldout, validation, train_chains, judge_lm = loop_parts
    with_mistakes = [
        item.chain for item in load_split(split_path("level-1", "test")) if item.chain.mistake_index is not None
    ]
    heldout = heldout | {"level-1": with_mistakes[:3]}
    run_dir = tmp_path / "procedural"
    provider = LocalProvider(tiny_model_dir, run_dir / "checkpoints", train, show_progress=False)
    settings = _settings(seeds_from="procedural", level_selection=selection, start_level=3, probe_items=3)
    run = dict(provider=provider, judge_lm=judge_lm, settings=settings, run_dir=run_dir, validation=validation)
    history = run_loop(train_chains, heldout, **run)
    assert [row["round"] for row in history] == [0, 1, 2]
    held = heldout_questions()
    levels = []
    for r in (1, 2):
        selection_file = json.loads((run_dir / f"round-{r}" / "selection.json").read_text())
        how = selection_file["procedural"]
        assert how["selection"] == selection
        chains = selection_file["chains"]
        assert all(c["source_id"].startswith("procedural/level-") for c in chains)
        assert not {normalize_question(c["question"]) for c in chains} & held
        seeds = {source_id for source_id, _ in selection_file["seeds"]}
        scenarios = [json.loads(line) for line in (run_dir / f"round-{r}" / "scenarios.jsonl").read_text().splitlines()]
        assert {s["chain"]["source_id"] for s in scenarios} == seeds
        if selection == "curriculum":
            assert [p["level"] for p in how["probe"]] == [d.level for d in LADDER]
            assert all(p["n"] == 3 for p in how["probe"]) and how["reason"].startswith(f"level {how['level']}")
            assert (run_dir / f"round-{r}" / "probe" / "level-6" / "predictions.jsonl").exists()
            levels.append(how["level"])
        else:
            assert sum(how["levels"].values()) == settings.seed_chains
    if selection == "curriculum":
        assert abs(levels[0] - 3) <= 1 and abs(levels[1] - levels[0]) <= 1  # one level a round at most
    for row in history:  # a level set is measured for location; recovery only on the GSM8K set
        level = row["heldout"]["level-1"]["gsm8k"]
        assert level["location_accuracy"]["n"] == 3 and not level.get("recovery_success", {}).get("n")
        assert row["heldout"]["gsm8k"]["gsm8k"]["recovery_success"]["n"]
    from misstep.optimize.arms_report import seed_mode_rows
    from misstep.optimize.report import write_report

    rows = seed_mode_rows(run_dir)  # issue 18's record of the mode: its seeds' difficulty, every set
    assert [row["round"] for row in rows] == [0, 1, 2] and rows[0]["difficulty"] is None
    assert all(set(row["heldout"]) == {"gsm8k", "level-1"} and row["heldout"]["level-1"]["n"] == 3 for row in rows)
    assert rows[0]["heldout"]["gsm8k"]["mcnemar_p_vs_round0"] is None
    for r in (1, 2):
        located = history[r]["heldout"]["level-1"]["gsm8k"]["location_accuracy"]["k"]
        assert rows[r]["heldout"]["level-1"]["correct"] == located
        assert 0 <= rows[r]["heldout"]["level-1"]["mcnemar_p_vs_round0"] <= 1
        if selection == "curriculum":
            chosen = difficulty_of(levels[r - 1])
            assert rows[r]["difficulty"] == {**asdict(chosen), "ops": list(chosen.ops)}
        else:
            assert rows[r]["difficulty"] is None and sum(rows[r]["levels_drawn"].values()) == settings.seed_chains
    report = write_report(run_dir).read_text()  # the chosen level per round, beside the probe's figures
    assert "### Seed chains' difficulty" in report and f"| 2 | {selection} |" in report
    assert (run_dir / "levels.png").stat().st_size > 1000
    before = {r: (run_dir / f"round-{r}" / "selection.json").read_text() for r in (1, 2)}
    again = run_loop(train_chains, heldout, **run)
    assert again == history and before == {r: (run_dir / f"round-{r}" / "selection.json").read_text() for r in (1, 2)}
    provider.close()


def test_locate_warm_up_trains_round_0_on_the_controls_data_from_chains_nothing_else_uses(gsm8k_train, gsm8k_test):
    """Stage-3 records on injector-labelled chains (15% valid), drawn where no demo, ground truth,
    judge chain, verification chain, seed or held-out question comes from."""
    from misstep.optimize.rounds import _starting_data

    measured = {"heldout": {"gsm8k": gsm8k_test[:4]}, "validation": {}}
    pool = gsm8k_test[:4] + gsm8k_train  # held-out questions in the training chains: never drawn
    settings = _settings(locate_warm_up=20, verification_chains=2)
    start = _starting_data(pool, measured, None, settings, writes=True)
    assert len(start.locate_records) == 20
    prompts = [r["messages"][-2]["content"] for r in start.locate_records]
    answers = [r["messages"][-1]["content"] for r in start.locate_records]
    assert sum("[[ ## has_mistake ## ]]\nFalse" in a for a in answers) == 3  # 15% valid
    located = {q for q in (c.question for c in gsm8k_train) if any(q in p for p in prompts)}
    assert len(located) >= 10
    elsewhere = {c.question for c in start.pool + start.judge_chains + start.verification_chains + gsm8k_test[:4]}
    elsewhere |= {e.question for examples in (*start.truth.values(), *start.demos.values()) for e in examples}
    assert not located & elsewhere
    assert _starting_data(pool, measured, None, _settings(), writes=True).locate_records == []
    with pytest.raises(ValueError, match="needs warm_up"):
        _settings(locate_warm_up=10, warm_up=False)


def test_arm_variants_are_named_by_what_varies_and_differ_only_there():
    from misstep.optimize.run import arm_variants

    loop = _settings(active_selection=True)
    arms = arm_variants(loop, ["judge", "oracle"])
    assert list(arms) == ["judge", "oracle"] and arms["oracle"].keep == "oracle"
    assert all(not v.active_selection and v.seeds_from == "gsm8k" for v in arms.values())  # the same chains
    modes = arm_variants(loop, ["judge"], ["gsm8k", "curriculum", "uniform"])
    assert list(modes) == ["gsm8k", "curriculum", "uniform"]
    assert (modes["curriculum"].seeds_from, modes["curriculum"].level_selection) == ("procedural", "curriculum")
    assert (modes["uniform"].seeds_from, modes["uniform"].level_selection) == ("procedural", "uniform")
    for variant in modes.values():  # nothing else differs
        assert replace(variant, seeds_from="gsm8k", level_selection="curriculum") == replace(
            loop, active_selection=False
        )
    both = arm_variants(loop, ["judge", "random"], ["gsm8k", "uniform"])
    assert list(both) == ["judge-gsm8k", "judge-uniform", "random-gsm8k", "random-uniform"]
    with pytest.raises(ValueError, match="seed modes are"):
        arm_variants(loop, ["judge"], ["gsm8k", "sideways"])
    with pytest.raises(ValueError, match="each arm once: 'judge' given more than once"):
        arm_variants(loop, ["judge", "judge"])
    with pytest.raises(ValueError, match="each seed mode once: 'uniform' given more than once"):
        arm_variants(loop, ["judge"], ["uniform", "gsm8k", "uniform"])
    with pytest.raises(ValueError, match="at least one arm"):
        arm_variants(loop, [])


def test_the_arms_table_reads_each_floor_from_its_own_baseline():
    from misstep.optimize.arms_report import _floors

    measured = {"majority_baseline": {"k": 102, "n": 360}, "last_step_baseline": {"k": 113, "n": 360}}
    assert _floors({"heldout": {"gsm8k": {"gsm8k": measured}}}) == {"majority": 102, "last_step": 113}
    assert _floors({"heldout": {}}) == {"majority": None, "last_step": None}  # a round measured elsewhere


def test_named_arms_run_exactly_the_arms_named_each_as_arm_variants_makes_it():
    from misstep.optimize.run import arm_variants, named_arms

    loop = _settings(active_selection=True)
    names = ["judge", "oracle", "random", "judge-curriculum", "oracle-uniform"]
    arms = named_arms(loop, names)
    assert list(arms) == names  # these five, not the fifteen --keep and --seed-mode would combine
    assert arms["judge"] == arm_variants(loop, ["judge"])["judge"]  # seeds as the configuration draws them
    assert arms["judge-curriculum"] == arm_variants(loop, ["judge"], ["gsm8k", "curriculum"])["curriculum"]
    assert arms["oracle-uniform"] == arm_variants(loop, ["oracle"], ["uniform"])["oracle"]
    assert arms["oracle-uniform"].keep == "oracle" and arms["oracle-uniform"].level_selection == "uniform"
    for bad in (["judge-sideways"], ["best"], ["judge-"], ["judge", "judge"], []):
        with pytest.raises(ValueError, match="an arm is|each arm once|at least one"):
            named_arms(loop, bad)


def test_a_training_file_that_leaves_no_seed_chain_is_refused_before_anything_runs(
    tmp_path, tiny_model_dir, loop_parts
):
    # The shipped 40-chain sample with the loop's default sizes: demos, ground truth and the writer's
    # ground truth take every chain, so a run would go on for hours with nothing to write from.
    train, heldout, validation, train_chains, judge_lm = loop_parts
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", train, show_progress=False)
    run_dir = tmp_path / "too-few"
    with pytest.raises(
        ValueError, match=r"training chains are too few.*no chain is left for the 32 seed chains.*--data"
    ):
        run_loop(train_chains, heldout, provider=provider, judge_lm=judge_lm, settings=LoopSettings(), run_dir=run_dir)
    assert not (run_dir / "round-0").exists() and not (run_dir / "judge").exists()
