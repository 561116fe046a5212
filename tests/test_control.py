"""The positive control's data, and one control run end to end on the tiny model."""

import json
from collections import Counter
from pathlib import Path

import pytest

from misstep.data import load_chains, sample_path
from misstep.data.records import format_steps
from misstep.data.splits import load_split, split_path
from misstep.lm.training import TrainSettings
from misstep.metrics.injector import INJECTABLE_TYPES
from misstep.metrics.oracle import first_error
from misstep.optimize.control import CUE, POSITIONS, ControlRun, control_chains, run_control, training_records

RESULT_KEYS = {
    "train_records",
    "cue",
    "split",
    "heldout_n",
    "correct",
    "majority_baseline_correct",
    "last_step_baseline_correct",
    "mcnemar_p",
    "learning_rate",
    "epochs",
    "loss",
    "predictions",
}


@pytest.fixture(scope="module")
def pool():
    return load_chains(sample_path("gsm8k/train.jsonl"))


def test_control_chains_balance_positions_and_keep_the_valid_share(pool):
    chains = control_chains(pool, 14, valid_share=0.15, seed=0)
    assert len(chains) == 14 and len({c.question for c in chains}) == 14  # one chain per question
    assert sum(c.mistake_index is None for c in chains) == 2
    buckets = Counter(min(c.mistake_index, POSITIONS - 1) for c in chains if c.mistake_index is not None)
    # Every bucket used, none far above another (this 40-chain sample has few long chains, so the
    # cap of an even share is raised once; on GSM8K's train set the buckets come out equal).
    assert len(buckets) == POSITIONS and max(buckets.values()) - min(buckets.values()) <= 2
    by_question = {c.question: c for c in pool}
    for chain in chains:  # every label is the oracle's, against the valid chain it came from
        assert first_error(chain.steps, reference=by_question[chain.question].steps) == chain.mistake_index
    assert control_chains(pool, 14, seed=0) == chains  # a pure function of its inputs
    with pytest.raises(ValueError, match="fewer than"):
        control_chains(pool[:5], 20)


def test_natural_positions_are_the_injectors_own_choice_as_in_the_heldout_splits(pool):
    """Each invalid chain is what the injector makes of its source unasked, as in the held-out splits
    (on GSM8K's train set 43% of them then err at the last step, against 71% balanced)."""
    from misstep.metrics.injector import inject

    natural = control_chains(pool, 14, seed=0, positions="natural")
    assert len(natural) == 14 and sum(c.mistake_index is None for c in natural) == 2
    by_question = {c.question: c for c in pool}
    types = {}
    for chain in natural:  # each invalid chain is what the injector makes of its source on its own
        source = by_question[chain.question]
        if chain.mistake_index is not None:
            types[chain.question] = next(t for t in INJECTABLE_TYPES if _injects(inject, source, t, chain))
    assert len(types) == 12
    assert control_chains(pool, 14, seed=0, positions="natural") == natural


def _injects(inject, source, error_type, chain):
    from misstep.metrics.injector import InjectionError

    try:
        return inject(source, error_type, seed=0) == chain
    except (InjectionError, ValueError):
        return False


def test_paired_positions_give_each_question_two_different_first_errors(pool):
    chains = control_chains(pool, 14, seed=0, positions="pairs")
    bad = [c for c in chains if c.mistake_index is not None]
    assert len(chains) == 14 and len(bad) == 12
    by_question: dict[str, list] = {}
    for chain in bad:
        by_question.setdefault(chain.question, []).append(chain)
    assert len(by_question) == 6
    sources = {c.question: c for c in pool}
    for question, pair in by_question.items():
        assert len(pair) == 2 and pair[0].mistake_index != pair[1].mistake_index
        for chain in pair:  # both real first errors that change the answer
            assert first_error(chain.steps, reference=sources[question].steps) == chain.mistake_index
            assert chain.answer != sources[question].answer
    valid_questions = {c.question for c in chains if c.mistake_index is None}
    assert not valid_questions & set(by_question)  # valid chains come from other questions
    with pytest.raises(ValueError, match="positions takes"):
        control_chains(pool, 14, positions="sorted")


def test_the_cue_marks_exactly_the_first_erroneous_step(pool):
    chains = control_chains(pool, 12, seed=0)
    cued = training_records(chains, cue=True, loss="stage3")
    plain = training_records(chains, cue=False, loss="stage3")
    assert len(cued) == len(plain) == len(chains)
    for chain, record, bare in zip(chains, cued, plain):
        prompt, answer = record["messages"][-2]["content"], record["messages"][-1]["content"]
        assert CUE not in bare["messages"][-2]["content"]
        marked = [line for line in prompt.splitlines() if line.endswith(CUE)]
        if chain.mistake_index is None:
            assert not marked
            assert (
                answer.startswith("[[ ## has_mistake ## ]]\nFalse\n") and "[[ ## first_error_step ## ]]\n0\n" in answer
            )
        else:
            step = chain.mistake_index + 1
            assert marked == [f"Step {step}: {chain.steps[chain.mistake_index]}{CUE}"]
            assert f"[[ ## first_error_step ## ]]\n{step}\n" in answer
        assert format_steps(chain.steps) in bare["messages"][-2]["content"]
    mixed = training_records(chains, cue=False, loss="all")
    stages = Counter(r["messages"][-1]["content"].split("\n")[0] for r in mixed)
    assert stages["[[ ## has_mistake ## ]]"] == len(chains)  # stage 3 once per chain, the rest beside it
    assert len(stages) > 1 and len(mixed) > len(chains)


def test_a_control_run_trains_measures_and_resumes_without_training_again(tmp_path, tiny_model_dir, pool):
    items = load_split(split_path("gsm8k", "test"))[:6]
    run = ControlRun(train_records=8, cue=True, learning_rate=1e-3, epochs=1.0, loss_weighting="fields")
    assert run.name == "cue-n8-lr0.001-e1-stage3-wfields-s0"
    settings = TrainSettings(method="full", batch_size=4, max_length=512)
    result = run_control(
        run,
        pool,
        items,
        model_dir=tiny_model_dir,
        run_dir=tmp_path,
        settings=settings,
        num_threads=3,
        show_progress=False,
    )
    assert RESULT_KEYS <= result.keys()
    assert result["heldout_n"] == 6 and result["split"] == "test" and result["cue"] is True
    folder = tmp_path / run.name
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["item_id"] for p in predictions) == sorted(i.item_id for i in items)
    assert result["correct"] == sum(p["correct"] for p in predictions)
    assert result["majority_baseline_correct"] >= 1 and result["last_step_baseline_correct"] >= 0
    trained_at = (folder / "model" / "model.safetensors").stat().st_mtime_ns
    summary = json.loads((folder / "model" / "train_summary.json").read_text())
    assert summary["settings"]["loss_weighting"] == "fields"

    # Killed during the evaluation: the rerun asks only the items not yet answered, and trains nothing.
    (folder / "result.json").unlink()
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions[:4]))
    again = run_control(
        run,
        pool,
        items,
        model_dir=tiny_model_dir,
        run_dir=tmp_path,
        settings=settings,
        num_threads=3,
        show_progress=False,
    )
    assert again["heldout_n"] == 6
    assert (folder / "model" / "model.safetensors").stat().st_mtime_ns == trained_at
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 6

    # The same model measured on the validation split (settings are chosen there): files of its own.
    records = (folder / "train_records.jsonl").read_text()
    validation = load_split(split_path("gsm8k", "validation"))[:4]
    chosen_on = run_control(
        run,
        pool,
        validation,
        model_dir=tiny_model_dir,
        run_dir=tmp_path,
        settings=settings,
        num_threads=3,
        show_progress=False,
    )
    assert chosen_on["split"] == "validation" and chosen_on["heldout_n"] == 4
    assert len((folder / "predictions-validation.jsonl").read_text().splitlines()) == 4
    assert json.loads((folder / "result.json").read_text())["heldout_n"] == 6  # the test result stands
    assert (folder / "result-validation.json").exists()
    assert (folder / "model" / "model.safetensors").stat().st_mtime_ns == trained_at
    assert (folder / "train_records.jsonl").read_text() == records


def test_the_control_command_records_each_run_once_and_refuses_bad_input(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from misstep.cli import app
    from misstep.data.splits import save_split

    split = tmp_path / "split.jsonl"
    save_split(split, load_split(split_path("gsm8k", "test"))[:5])
    results = tmp_path / "results" / "control.json"
    args = [
        "control",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(sample_path("gsm8k/train.jsonl")),
        "--split",
        str(split),
        "--size",
        "8",
        "--cue",
        "real",
        "--learning-rate",
        "1e-3",
        "--threads",
        "2",
        "--run-dir",
        str(tmp_path / "runs"),
        "--results",
        str(results),
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "correct; majority baseline" in first.output
    again = CliRunner().invoke(app, args)  # finished: read back, recorded once
    assert again.exit_code == 0, again.output
    runs = json.loads(results.read_text())["runs"]
    assert len(runs) == 1 and RESULT_KEYS <= runs[0].keys() and runs[0]["cue"] is False
    assert runs[0]["name"] == "real-n8-lr0.001-e1-stage3-s0" and runs[0]["learning_rate"] == 1e-3  # each option its own
    copied = Path(runs[0]["predictions"])
    assert copied.parent == results.parent / "control" and len(copied.read_text().splitlines()) == 5
    assert isinstance(runs[0]["slices"], list)
    assert sum(sum(row.values()) for row in runs[0]["confusion"]["by_true_label"].values()) == 5

    bad = CliRunner().invoke(app, args[:-4] + ["--cue", "maybe"])
    assert bad.exit_code == 2 and "--cue" in bad.output and "'maybe' is not one of 'cue', 'real'" in bad.output
    bad = CliRunner().invoke(app, args[:-4] + ["--loss-weighting", "records"])
    assert bad.exit_code == 2 and "--loss-weighting" in bad.output and "'records' is not one of" in bad.output
    missing = CliRunner().invoke(app, ["control", "--split", str(tmp_path / "nowhere.jsonl")])
    assert missing.exit_code == 2 and "nowhere.jsonl" in missing.output


def test_a_level_control_trains_on_procedural_chains_that_no_held_out_set_holds():
    """Level 1's chains have two steps: balanced positions fill the two buckets they reach (the cap
    climbs past the even share of six), and no training question is a committed level split's, even
    drawn from the seed the held-out sets were made from."""
    from misstep.data.splits import normalize_question
    from misstep.metrics.heldout import HELDOUT_SEED
    from misstep.optimize.control import procedural_training_pool
    from misstep.optimize.frontier import heldout_questions

    held = procedural_training_pool(1, 120, seed=HELDOUT_SEED)
    assert len(held) == 120 and not {normalize_question(c.question) for c in held} & heldout_questions()
    chains = control_chains(procedural_training_pool(1, 120), 40)
    labels = Counter(c.mistake_index for c in chains)
    assert labels[None] == 6 and labels[0] == labels[1] == 17 and len(labels) == 3
    with pytest.raises(ValueError, match="level must be one of"):
        procedural_training_pool(9, 10)


def test_the_control_command_takes_a_procedural_level(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from misstep.cli import app
    from misstep.data.procedural import NAMES
    from misstep.data.splits import save_split

    split = tmp_path / "level-1-test.jsonl"
    save_split(split, load_split(split_path("level-1", "test"))[:4])
    args = ["control", "--model", str(tiny_model_dir), "--level", "1", "--split", str(split), "--size", "8"]
    args += ["--cue", "real", "--threads", "2", "--run-dir", str(tmp_path / "runs")]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    [folder] = (tmp_path / "runs").iterdir()
    assert folder.name == "real-n8-lr0.0001-e1-stage3-level1-s0"
    result = json.loads((folder / "result.json").read_text())
    assert result["level"] == 1 and result["heldout_n"] == 4
    trained = [json.loads(line) for line in (folder / "train_records.jsonl").read_text().splitlines()]
    assert len(trained) == 8 and all(any(n in json.dumps(r) for n in NAMES) for r in trained)  # procedural, not GSM8K
    refused = CliRunner().invoke(app, args[:3] + ["--level", "9"] + args[5:])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "--level: level must be one of" in said, refused.output


def test_the_control_command_trains_a_lora_adapter_when_given_a_rank(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from misstep.cli import app
    from misstep.data.splits import save_split

    split = tmp_path / "gsm8k-test.jsonl"
    save_split(split, load_split(split_path("gsm8k", "test"))[:4])
    args = ["control", "--model", str(tiny_model_dir), "--split", str(split), "--size", "8", "--cue", "cue"]
    args += ["--lora-rank", "4", "--threads", "2", "--run-dir", str(tmp_path / "runs")]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    [folder] = (tmp_path / "runs").iterdir()
    assert folder.name == "cue-n8-lr0.0001-e1-stage3-lora4-s0"
    assert json.loads((folder / "result.json").read_text())["lora_rank"] == 4
    trained = json.loads((folder / "model" / "train_summary.json").read_text())["settings"]
    assert trained["method"] == "lora" and trained["lora_rank"] == 4
    refused = CliRunner().invoke(app, args[:-4] + ["--lora-rank", "0"] + args[-2:])
    assert refused.exit_code == 2 and "--lora-rank" in refused.output, refused.output


def test_a_measured_file_of_another_split_keeps_a_run_name_with_a_dot_whole():
    from misstep.optimize.control import measured_file

    assert measured_file("result.json", "test") == "result.json"
    assert measured_file("result.json", "validation") == "result-validation.json"
    name = "real-n1000-lr0.0001-e1-stage3-s0.jsonl"  # a learning rate's dot is not the suffix's
    assert measured_file(name, "validation") == "real-n1000-lr0.0001-e1-stage3-s0-validation.jsonl"


def _types_that_make(source, chain) -> set[str]:
    """The error types whose injection at some step turns `source` into `chain`."""
    from misstep.metrics.injector import InjectionError, applicable_steps, inject

    made = set()
    for error_type in INJECTABLE_TYPES:
        for step in applicable_steps(source, error_type):
            try:
                if inject(source, error_type, step=step, seed=0) == chain:
                    made.add(error_type)
            except InjectionError:
                continue
    return made


@pytest.mark.parametrize("positions", ["balanced", "natural", "pairs"])
def test_a_control_of_one_error_type_injects_that_type_alone(pool, positions):
    sources = {c.question: c for c in pool}

    def types(chains):
        return [_types_that_make(sources[c.question], c) for c in chains if c.mistake_index is not None]

    alone = control_chains(pool, 10, seed=0, positions=positions, error_types=("misread_quantity",))
    assert len(alone) == 10 and all("misread_quantity" in made for made in types(alone))
    mixed = control_chains(pool, 10, seed=0, positions=positions)
    assert any("misread_quantity" not in made for made in types(mixed))  # the check can fail


def test_a_control_of_one_error_type_is_named_for_it_and_measured_on_its_items_and_the_valid_chains(
    tmp_path, tiny_model_dir
):
    from typer.testing import CliRunner

    from misstep.cli import app
    from misstep.data.splits import save_split

    items = load_split(split_path("gsm8k", "test"))[:24]
    measured = [i for i in items if i.error_type == "misread_quantity" or i.chain.mistake_index is None]
    assert 0 < len(measured) < len(items)
    split = tmp_path / "gsm8k-test.jsonl"
    save_split(split, items)
    results = tmp_path / "control.json"
    args = ["control", "--model", str(tiny_model_dir), "--split", str(split), "--size", "8", "--cue", "real"]
    args += ["--error-type", "misread_quantity", "--threads", "2", "--run-dir", str(tmp_path / "runs")]
    done = CliRunner().invoke(app, args + ["--results", str(results)])
    assert done.exit_code == 0, done.output
    [folder] = (tmp_path / "runs").iterdir()
    assert folder.name == "real-n8-lr0.0001-e1-stage3-misread_quantity-s0"
    result = json.loads((folder / "result.json").read_text())
    assert result["error_type"] == "misread_quantity" and result["heldout_n"] == len(measured)
    predicted = {json.loads(line)["item_id"] for line in (folder / "predictions.jsonl").read_text().splitlines()}
    assert predicted == {i.item_id for i in measured}
    [published] = json.loads(results.read_text())["runs"]
    table = published["confusion"]["by_true_label"]  # over the measured items, as the result is
    assert sum(sum(answers.values()) for answers in table.values()) == len(measured)
    refused = CliRunner().invoke(app, args[:-4] + ["--error-type", "typo"] + args[-2:])
    assert refused.exit_code == 2 and "--error-type" in refused.output, refused.output
