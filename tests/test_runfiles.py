"""A run directory is one process's at a time: RunLock, and the commands that take it."""

import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from misstep.cli import app
from misstep.data.runfiles import RunDirBusy, RunLock

HOLD = (
    "import sys, time; from misstep.data.runfiles import RunLock; "
    "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def _holder(run_dir):
    """Another process that takes the run directory's lock and keeps it (the injected fault: a
    second command started while a first still runs)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusy, match=f"in use by process {holder.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path / "run"), RunLock(tmp_path / "run"):  # free again; and re-entrant in its holder
        pass
    with RunLock(tmp_path / "run"):
        held_here = subprocess.run(
            [sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(tmp_path / "run")],
            capture_output=True,
            text=True,
        )
        assert held_here.returncode != 0 and "RunDirBusy" in held_here.stderr
    freed = _holder(tmp_path / "run")  # released once the outermost holder here is done
    freed.kill()
    freed.wait()


def test_commands_that_write_a_held_run_directory_are_refused_and_report_is_not(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "twin"
    holder = _holder(run_dir)
    try:
        for command in (["generate", "--chains", "2"], ["evaluate", "--limit", "1"]):
            started = time.monotonic()
            result = CliRunner().invoke(app, [*command, "--model", str(tiny_model_dir), "--run-dir", str(run_dir)])
            assert result.exit_code == 2, result.output
            assert f"in use by process {holder.pid}" in " ".join(result.output.split())
            assert time.monotonic() - started < 60  # refused at once, not after the work
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written beside the lock
        report = CliRunner().invoke(app, ["report", str(run_dir)])  # it only reads: not refused
        assert "in use by process" not in report.output and "no finished round" in " ".join(report.output.split())
    finally:
        holder.kill()
        holder.wait()


def test_the_library_functions_that_write_a_run_directory_take_its_lock_before_any_work(tmp_path):
    from misstep.lm.training import TrainSettings
    from misstep.optimize.control import ControlRun, run_control
    from misstep.optimize.jobs import JobSettings, evaluate, generate
    from misstep.optimize.rounds import LoopSettings, run_loop

    run = ControlRun(train_records=1, cue=True, learning_rate=1e-4, epochs=1)
    calls = {  # arguments no work could use: each call must stop at the lock, before them
        "generate": lambda d: generate([], [], None, JobSettings(run_dir=d)),
        "evaluate": lambda d: evaluate([], None, JobSettings(run_dir=d)),
        "run_loop": lambda d: run_loop([], {}, provider=None, judge_lm=None, settings=LoopSettings(), run_dir=d),
        "run_control": lambda d: run_control(run, [], [], model_dir=d, run_dir=d.parent, settings=TrainSettings()),
    }
    for name, call in calls.items():
        run_dir = tmp_path / name / (run.name if name == "run_control" else "")
        holder = _holder(run_dir)
        try:
            with pytest.raises(RunDirBusy, match=f"in use by process {holder.pid}"):
                call(run_dir)
        finally:
            holder.kill()
            holder.wait()
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"], name
