import json
import os
import re
import subprocess
import sys

import pytest
from test_injector import PLAIN_CHAINS
from test_rounds import assert_no_question_in
from typer.testing import CliRunner

from misstep.cli import app
from misstep.data import sample_path
from misstep.data.splits import normalize_question
from misstep.offline import OFFLINE_ENVIRONMENT
from misstep.optimize.config import load_config

runner = CliRunner()


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_every_command_has_help():
    for command in ([], ["generate"], ["evaluate"], ["models"]):
        result = _invoke(*command, "--help")
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_generate_writes_scenarios_and_resumes_without_repeating(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    args = ["generate", "--model", tiny_model_dir, "--chains", 3, "--demos", 1, "--threads", 3, "--run-dir", run_dir]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    lines = (run_dir / "scenarios.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert {r["error_type"] for r in records} <= {"arithmetic_slip", "misread_quantity", "skipped_step"}
    assert (run_dir / "stages.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["scenarios"] == 3
    assert summary["constrained"] is True  # by default every stage decodes under its answer grammar
    assert summary["stages"]["describe"]["unparsable"] == 0  # so even random weights answer in the fields

    # A run killed mid-write leaves a torn last line; the rerun drops it and redoes that scenario only.
    with (run_dir / "scenarios.jsonl").open("a") as handle:
        handle.write('{"source_id": "gsm8k/train.jsonl:9", "err')
    lines[-1:] = []
    (run_dir / "scenarios.jsonl").write_text("\n".join(lines) + "\n" + '{"source_id": "torn')
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    again = [json.loads(line) for line in (run_dir / "scenarios.jsonl").read_text().splitlines()]
    assert len(again) == 3
    assert [r["source_id"] for r in again[:2]] == [r["source_id"] for r in records[:2]]


def test_evaluate_reports_each_task_with_intervals(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "eval"
    args = ("evaluate", "--model", tiny_model_dir, "--limit", 2, "--demos", 1, "--no-constrained", "--run-dir", run_dir)
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["_run"]["constrained"] is False
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert not any(p["parsed"] for p in predictions)  # random weights, left to themselves, never parse
    assert {"gsm8k", "logical_deduction", "multistep_arithmetic", "word_sorting", "all"} <= set(metrics)
    assert metrics["all"]["n"] == 8
    accuracy = metrics["all"]["location_accuracy"]
    assert accuracy["n"] == 8 and 0.0 <= accuracy["low"] <= accuracy["high"] <= 1.0
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 8
    assert (run_dir / "metrics.png").read_bytes().startswith(b"\x89PNG")


def test_evaluate_labels_plain_arithmetic_and_reports_what_it_could_not_use(tmp_path, tiny_model_dir):
    plain = [json.loads(line) for line in PLAIN_CHAINS.read_text().splitlines()][:3]
    plain[1]["answer"] = plain[1]["answer"].replace("\n####", "\nMia is happy with her change.\n####")
    data = tmp_path / "mine.jsonl"
    rows = [
        plain[0],
        {"question": "q?", "answer": "no final answer"},
        plain[1],
        {"question": "What is 2 and 2?", "answer": "It is four.\n#### 4"},
        plain[2],
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    result = _invoke(
        "evaluate",
        "--data",
        data,
        "--model",
        tiny_model_dir,
        "--no-recover",
        "--demos",
        0,
        "--threads",
        3,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "data_report.json").read_text()) == {
        str(data): {
            "loaded": 3,
            "skipped": {"no final answer": 1, "no checkable step": 1},
            "example_line": {"no final answer": 2, "no checkable step": 4},
            "unreadable_steps": 1,  # the prose step added below: left alone
        }
    }
    assert f"{data}: used 3; skipped" in " ".join(result.output.split())
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 3


def _binary(folder):
    path = folder / "data.jsonl"
    path.write_bytes(b"\xff\xfe{\x00}")
    return path


def test_bad_input_is_refused_before_any_work(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q?", "answer": "1\\n#### 1"}\n{"question": "q?"}\n')
    result = _invoke("generate", "--data", bad, "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2
    assert f"{bad}:2: field 'answer': missing" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
    written = tmp_path / "written"  # a run directory with results in it loses nothing to bad input
    written.mkdir()
    (written / "metrics.json").write_text('{"kept": true}')
    for broken in (bad, _binary(tmp_path)):
        result = _invoke("evaluate", "--data", broken, "--model", tiny_model_dir, "--run-dir", written)
        assert result.exit_code == 2 and str(broken) in " ".join(result.output.split())
    assert [p.name for p in written.iterdir()] == ["metrics.json"]
    assert (written / "metrics.json").read_text() == '{"kept": true}'

    result = _invoke("generate", "--error-type", "typo", "--model", tiny_model_dir)
    assert result.exit_code == 2 and "--error-type: unknown error type 'typo'" in result.output
    result = _invoke("evaluate", "--model", tmp_path, "--limit", 1)
    assert result.exit_code == 2 and "no config.json" in result.output


def test_compile_stops_clearly_when_the_judge_keeps_nothing(tmp_path, tiny_model_dir):
    """A random model's answers never parse, so there is no trace to train on: a clear error, no crash."""
    run_dir = tmp_path / "compile"
    result = _invoke(
        "compile",
        "--model",
        tiny_model_dir,
        "--train-size",
        2,
        "--heldout-size",
        2,
        "--demos",
        1,
        "--ground-truth",
        0,
        "--threads",
        2,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 2, result.output
    assert "no trace to train on" in result.output and "dropped_by_metric" in result.output
    assert (run_dir / "round-0" / "heldout" / "gsm8k" / "metrics.json").exists()  # work done before the failure stays


def test_compile_warms_up_compiles_and_resumes_without_retraining(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "compile"
    # The training file starts with the held-out file's questions, recased: compile must keep them out.
    heldout = [json.loads(line) for line in sample_path("gsm8k/test.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in sample_path("gsm8k/train.jsonl").read_text().splitlines()]
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({**r, "question": r["question"].upper()}) + "\n" for r in heldout)
        + "".join(json.dumps(r) + "\n" for r in train)
    )
    args = (
        "compile",
        "--model",
        tiny_model_dir,
        "--train-size",
        2,
        "--heldout-size",
        2,
        "--demos",
        1,
        "--ground-truth",
        2,
        "--warm-up",
        "--judge-warm-up",
        "--method",
        "full",
        "--learning-rate",
        1e-3,
        "--threads",
        2,
        "--data",
        data,
        "--demo-data",
        data,
        "--run-dir",
        run_dir,
    )
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    for label in ("after warm-up", "after compile"):  # round 0 and round 1 of the loop
        assert label in result.output
    assert "floors on the same items: majority label" in " ".join(result.output.split())
    for folder in ("round-0", "round-1"):
        assert (run_dir / folder / "heldout" / "gsm8k" / "metrics.json").exists()
    report = json.loads((run_dir / "round-1" / "compile_report.json").read_text())
    assert report["bootstrap"]["extra_records"] == 4 and report["bootstrap"]["traced"] == 2
    warm = json.loads((run_dir / "round-0" / "compile_report.json").read_text())
    assert report["training"]["base_model"] == warm["model_dir"]  # the compile trained on from the warmed weights
    judge = json.loads((run_dir / "judge" / "compile_report.json").read_text())
    # a success and a failure for each of 2 chains, and 2 curation examples
    assert judge["warm_up"]["ground_truth_records"] == 2 * 2 + 2
    assert judge["training"]["base_model"] == str(tiny_model_dir)  # the judge never trains on the student
    checkpoints = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("compile-"))
    assert len(checkpoints) == 3  # student warm-up, judge warm-up, compile
    assert json.loads((run_dir / "round-1" / "round.json").read_text())["traced"] == 2
    assert (run_dir / "report.md").exists()

    assert_no_question_in({normalize_question(r["question"]) for r in heldout}, run_dir / "checkpoints")

    again = _invoke(*args)  # everything is done: nothing is trained again
    assert again.exit_code == 0, again.output
    assert sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("compile-")) == checkpoints


def test_optimize_runs_a_round_and_writes_a_report_readable_alone(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "loop"
    result = _invoke(
        "optimize",
        "--rounds",
        1,
        "--model",
        tiny_model_dir,
        "--seed-chains",
        2,
        "--heldout-size",
        2,
        "--ground-truth",
        2,
        "--demos",
        1,
        "--trials",
        3,
        "--method",
        "full",
        "--learning-rate",
        1e-3,
        "--threads",
        2,
        "--verification-chains",
        2,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, result.output
    config = load_config(run_dir / "config.toml")  # what it ran with, readable as a --config file
    assert (
        config.loop.rounds,
        config.loop.seed_chains,
        config.loop.num_threads,
        config.engine.max_batch_size,
        config.train.method,
        config.train.learning_rate,
    ) == (1, 2, 2, 2, "full", 1e-3)
    report = (run_dir / "report.md").read_text()
    assert "| 0 |" in report and "| 1 |" in report and "Best round" in report
    writer = report.split("### What the model wrote")[1].split("###")[0]
    assert re.search(r"\| 1 \| .*\(\d/2\) \| .*\(\d/2\) \|", writer)  # both rates, over round 1's 2 scenarios
    timing = report.split("### Wall time by step")[1]
    assert "warm_up" in timing and "compile" in timing and "heldout" in timing
    for plot in ("heldout.png", "judge.png", "diversity.png"):
        assert (run_dir / plot).stat().st_size > 1000
    (run_dir / "report.md").unlink()
    again = _invoke("report", run_dir)  # the report comes from the run's files alone
    assert again.exit_code == 0 and (run_dir / "report.md").read_text() == report


def test_optimize_refuses_bad_arguments_before_any_work(tmp_path, tiny_model_dir):
    result = _invoke("optimize", "--error-type", "typo", "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "--error-type: unknown error type 'typo'" in result.output
    result = _invoke("optimize", "--engine", "tpu", "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "--engine: serving must be one of" in " ".join(result.output.split())
    config = tmp_path / "run.toml"
    config.write_text("[loop]\nrounds = 2\nseed_chain = 4\n")
    result = _invoke("optimize", "--config", config, "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and f"{config}: unknown key loop.seed_chain" in " ".join(result.output.split())
    result = _invoke("optimize", "--keep", "best", "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "--keep" in result.output and "'best' is not one of" in result.output
    config.write_text('[loop]\nkeep = "best"\n')
    result = _invoke("optimize", "--config", config, "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "keep must be one of 'judge', 'oracle', 'all', 'random'" in " ".join(
        result.output.split()
    )
    result = _invoke("optimize", "--arm", "judge-sideways", "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    said = " ".join(result.output.split())
    assert (
        result.exit_code == 2 and "--arm: an arm is <keep> or <keep>-<seed mode>" in said and "'judge-sideways'" in said
    )
    result = _invoke(
        "optimize", "--arm", "judge", "--arm", "judge", "--model", tiny_model_dir, "--run-dir", tmp_path / "r"
    )
    assert result.exit_code == 2 and "--arm: each arm once: 'judge' given more than once" in " ".join(
        result.output.split()
    )
    result = _invoke(
        "optimize", "--keep", "oracle", "--keep", "oracle", "--model", tiny_model_dir, "--run-dir", tmp_path / "r"
    )
    assert result.exit_code == 2 and "--keep, --seed-mode: each arm once: 'oracle'" in " ".join(result.output.split())
    result = _invoke(
        "optimize", "--arm", "judge", "--keep", "oracle", "--model", tiny_model_dir, "--run-dir", tmp_path / "r"
    )
    assert result.exit_code == 2 and "without --keep and --seed-mode" in " ".join(result.output.split())
    result = _invoke("optimize", "--judge-epochs", "0", "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "judge_epochs must be above 0" in " ".join(result.output.split())
    result = _invoke("optimize", "--judge-max-length", "8", "--model", tiny_model_dir, "--run-dir", tmp_path / "r")
    assert result.exit_code == 2 and "judge_max_length must be at least 16" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
    result = _invoke("report", tmp_path / "nothing")
    assert result.exit_code == 2 and "no finished round" in " ".join(result.output.split())


def test_importing_misstep_changes_no_environment_and_offline_is_asked_for():
    # In a fresh interpreter with none of the switches set: the conftest's process has them.
    environment = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    script = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "import misstep\n"
        "assert dict(os.environ) == before, 'import misstep changed the environment'\n"
        "assert 'dspy' not in sys.modules and 'litellm' not in sys.modules\n"
        "misstep.offline()\n"
        "assert os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] == 'True' and os.environ['HF_HUB_OFFLINE'] == '1'\n"
        "assert misstep.Chain.__name__ == 'Chain' and callable(misstep.inject)\n"
    )
    ran = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    command = subprocess.run(
        [sys.executable, "-m", "misstep", "--help"], env=environment, capture_output=True, text=True
    )
    assert command.returncode == 0 and "optimize" in command.stdout, command.stderr


def test_every_command_ends_a_full_disk_or_a_busy_run_dir_with_one_clear_line(tmp_path, capsys):
    """The error boundary (`refusing`) stands around every command: the disk filling up mid-run,
    or a run directory another process holds, ends in one red line and exit status 2."""
    import errno

    import typer

    from misstep.data.runfiles import RunDirBusy
    from misstep.options import refusing

    unguarded = [c.callback.__name__ for c in app.registered_commands if not getattr(c.callback, "refuses", False)]
    assert unguarded == []

    @refusing
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    @refusing
    def busy():
        raise RunDirBusy("runs/x is in use by process 7")

    for call, expected in ((lambda: full(tmp_path / "f.json"), "the disk is full"), (busy, "process 7")):
        with pytest.raises(typer.Exit) as stopped:
            call()
        assert stopped.value.exit_code == 2
        assert expected in " ".join(capsys.readouterr().out.split())
    with pytest.raises(OSError):  # other faults are not hidden as if they were a full disk
        refusing(lambda: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))()


def test_every_configuration_option_is_an_option_of_some_command():
    """An entry of OPTIONS that no command lists is a setting the command line cannot reach."""
    import inspect

    from misstep.options import OPTIONS

    offered = {name for c in app.registered_commands for name in inspect.signature(c.callback).parameters}
    assert sorted(set(OPTIONS) - offered) == []
    result = runner.invoke(app, ["optimize", "--seeds-from", "procedural", "--level-selection", "sideways"])
    assert result.exit_code == 2 and "level_selection must be 'curriculum' or 'uniform'" in " ".join(
        result.output.split()
    )
