"""How a vLLM server is started is configuration: tensor parallelism and pass-through arguments
reach the server's command line, and eager mode is the CPU's default only."""

from pathlib import Path

from misstep.lm.serving import VllmOptions


def test_tensor_parallelism_and_extra_arguments_reach_the_server_command():
    options = VllmOptions(python="/opt/py", tensor_parallel_size=4, extra_args=["--max-num-seqs", "64"])
    command = options.command(Path("/models/m"), "m-1a2b", 8123)
    assert command[:3] == ["/opt/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--tensor-parallel-size") + 1] == "4"
    assert command[-2:] == ["--max-num-seqs", "64"]
    assert command[command.index("--port") + 1] == "8123" and command[command.index("--host") + 1] == "127.0.0.1"


def test_eager_mode_is_the_cpu_default_and_can_be_forced_either_way(monkeypatch):
    import misstep.lm.serving as serving

    for has_cuda, eager_by_default in ((False, True), (True, False)):
        monkeypatch.setattr(serving, "_has_cuda", lambda: has_cuda)
        assert ("--enforce-eager" in VllmOptions().command(Path("m"), "m", 1)) is eager_by_default
        assert "--enforce-eager" in VllmOptions(enforce_eager=True).command(Path("m"), "m", 1)
        assert "--enforce-eager" not in VllmOptions(enforce_eager=False).command(Path("m"), "m", 1)
    monkeypatch.setattr(serving, "_has_cuda", lambda: True)
    command = VllmOptions().command(Path("m"), "m", 1)
    assert command[command.index("--dtype") + 1] == "auto"  # vLLM's choice (bf16) on a GPU; float32 on CPU
    monkeypatch.setattr(serving, "_has_cuda", lambda: False)
    command = VllmOptions().command(Path("m"), "m", 1)
    assert command[command.index("--dtype") + 1] == "float32"
