"""Faults a run directory survives: a second process (RunLock, and the commands that take it), and a
full disk at any write."""

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _run_files(run_dir):
    """What a run leaves, less what differs between any two runs (timings, the engine's counters,
    the lock and the plot's pixels)."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_dir() or path.name in (".lock", "stages.png"):
            continue
        text = path.read_text()
        if path.name == "summary.json":
            summary = json.loads(text)
            summary.pop("wall_seconds_this_run"), summary.pop("engine")
            text = json.dumps(summary, sort_keys=True)
        files[str(path.relative_to(run_dir))] = text
    return files


def test_a_full_disk_at_every_write_of_a_run_stops_it_clearly_and_the_rerun_loses_nothing(
    tmp_path, tiny_model_dir, monkeypatch
):
    import errno

    from misstep.data import runfiles

    writes = {"count": 0, "fail_at": None}
    atomic, append = runfiles._write_atomic, runfiles.JsonlLog.append

    def counted(write):  # the injected fault: the write layer's k-th write finds the disk full
        def wrapper(*args, **kwargs):
            writes["count"] += 1
            if writes["count"] == writes["fail_at"]:
                raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
            return write(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runfiles, "_write_atomic", counted(atomic))
    monkeypatch.setattr(runfiles.JsonlLog, "append", counted(append))

    def generate(run_dir, fail_at=None):
        writes.update(count=0, fail_at=fail_at)
        args = ["generate", "--chains", "3", "--demos", "1", "--threads", "1", "--model", str(tiny_model_dir)]
        return CliRunner().invoke(app, [*args, "--run-dir", str(run_dir)])

    whole = generate(tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    total, expected = writes["count"], _run_files(tmp_path / "whole")
    assert total >= 4 and "scenarios.jsonl" in expected  # three scenarios and the summary, at least
    for k in range(1, total + 1):
        run_dir = tmp_path / f"full-at-{k}"
        stopped = generate(run_dir, fail_at=k)
        assert stopped.exit_code == 2, (k, stopped.output)
        assert "the disk is full" in " ".join(stopped.output.split()), (k, stopped.output)
        again = generate(run_dir)  # space freed
        assert again.exit_code == 0, (k, again.output)
        assert _run_files(run_dir) == expected, k


# Timings, and "_run" (the engine's counters, which count what each attempt did): they differ between runs.
_TIMINGS = re.compile(r"second|wall|per_s|peak|resumed_at|^_run$")


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not _TIMINGS.search(k)}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _loop_files(run_dir):
    """A loop's JSON and JSONL files and the weights' digests, less timings (which differ between
    any two runs); plots, logs and the Optuna database are left out."""
    files = {}
    for path in sorted(run_dir.rglob("*")):
        name = str(path.relative_to(run_dir))
        if path.suffix == ".json":
            files[name] = _without_timings(json.loads(path.read_text()))
        elif path.suffix == ".jsonl":
            records = [_without_timings(json.loads(line)) for line in path.read_text().splitlines()]
            # The records, not their order: threads append them as they finish.
            files[name] = sorted(records, key=lambda record: json.dumps(record, sort_keys=True))
        elif path.suffix == ".safetensors":
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def test_a_full_disk_at_each_write_of_a_one_round_optimize_stops_it_clearly_and_it_resumes_to_the_same_files(
    tmp_path, tiny_model_dir, monkeypatch
):
    """A one-round loop on the tiny model, its run-file writes and its weights' saves watched: each
    attempt finds the disk full at the first write no attempt has made or been stopped at yet (a
    file, a record of a JSONL file, a checkpoint's weights), so every write of the run is hit once,
    in turn, and each rerun continues from what the attempts before it left."""
    import errno

    from misstep.data import runfiles
    from misstep.lm import training

    state = {"run_dir": None, "made": set(), "hit": set(), "fill": False}

    def key(kind, path, *rest):
        path = Path(path).resolve()
        return (kind, str(path.relative_to(state["run_dir"].resolve())), *rest)

    def watched(write, key_of):  # the injected fault: the disk is full at the first write not made before
        def wrapper(*args, **kwargs):
            made = key_of(*args)
            if state["fill"] and made not in state["made"] | state["hit"]:
                state["hit"].add(made)  # the disk is freed for it before the next attempt
                raise OSError(errno.ENOSPC, "No space left on device", made[1])
            result = write(*args, **kwargs)
            state["made"].add(made)
            return result

        return wrapper

    def lines(path):
        return len(Path(path).read_text().splitlines()) if Path(path).exists() else 0

    monkeypatch.setattr(runfiles, "_write_atomic", watched(runfiles._write_atomic, lambda p, _: key("file", p)))
    append = watched(runfiles.JsonlLog.append, lambda log, _: key("record", log.path, lines(log.path)))
    monkeypatch.setattr(runfiles.JsonlLog, "append", append)
    weights = watched(training._save_weights, lambda _m, _t, folder, _s: key("weights", folder))
    monkeypatch.setattr(training, "_save_weights", weights)

    def optimize(run_dir, fill=False):
        state.update(run_dir=run_dir, fill=fill)
        args = ["optimize", "--rounds", "1", "--model", str(tiny_model_dir), "--seed-chains", "2"]
        args += ["--heldout-size", "2", "--ground-truth", "2", "--demos", "1", "--trials", "3", "--threads", "2"]
        args += ["--method", "full", "--learning-rate", "1e-3", "--verification-chains", "1", "--run-dir", str(run_dir)]
        return CliRunner().invoke(app, args)

    # Both runs in one folder: checkpoints are named by a hash of the weights' path they start from.
    run_dir = tmp_path / "run"
    whole = optimize(run_dir)
    assert whole.exit_code == 0, whole.output
    writes, expected = len(state["made"]), _loop_files(run_dir)
    shutil.rmtree(run_dir)
    assert writes >= 20 and "round-1/kept.jsonl" in expected
    assert any(k[0] == "weights" for k in state["made"]) and any(k[0] == "record" for k in state["made"])

    state["made"] = set()
    stops = 0
    while (hit := optimize(run_dir, fill=True)).exit_code != 0:
        stops += 1
        assert hit.exit_code == 2 and "the disk is full" in " ".join(hit.output.split()), hit.output
        assert stops <= writes, "a rerun did not get past the write it stopped at"
    assert stops == len(state["hit"]) == len(state["made"]) == writes  # every write of the run was hit once
    got = _loop_files(run_dir)
    differing = {
        k: (expected.get(k), got.get(k)) for k in expected.keys() | got.keys() if expected.get(k) != got.get(k)
    }
    assert not differing, json.dumps(differing, indent=1, default=str)[:4000]


def test_logged_work_comes_back_in_the_work_order_whatever_order_the_threads_finished_in(tmp_path, tiny_lm):
    """The later items finish first, so the file is in reverse; what is made of the records (a set
    cut short, training data) must not depend on that."""
    from misstep.programs.parallel import map_logged

    items = list(range(6))

    def slow_first(item: int) -> dict:
        time.sleep(0.05 * (len(items) - item))
        return {"key": str(item), "square": item * item}

    path = tmp_path / "work.jsonl"
    records = map_logged(slow_first, items, path, str, lm=tiny_lm, num_threads=6, show_progress=False)
    assert [r["key"] for r in records] == [str(i) for i in items]
    written = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert written != [str(i) for i in items] and sorted(written) == sorted(str(i) for i in items)
    assert map_logged(slow_first, items[:3], path, str, lm=tiny_lm, show_progress=False) == records[:3]


def test_evaluate_recovers_from_the_first_n_mistaken_chains_only(tmp_path, tiny_lm, gsm8k_test):
    """The same items each time: a round's recovery is measured on a fixed, pairable subset."""
    from misstep.metrics.evaluation import injected_gsm8k
    from misstep.optimize.jobs import JobSettings, evaluate

    chains = injected_gsm8k(gsm8k_test[:6], 6)
    mistaken = [c.source_id for c in chains if c.mistake_index is not None]
    assert len(mistaken) >= 3
    evaluate(chains, tiny_lm, JobSettings(tmp_path / "e", num_threads=2), recover_limit=2)
    records = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["source_id"] for r in records if "recovery_ok" in r) == sorted(mistaken[:2])
    assert len(records) == len(chains)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["gsm8k"]["recovery_success"]["n"] == 2
