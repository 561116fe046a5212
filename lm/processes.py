"""Stopping a process that was started in a session of its own, with everything in its group."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to `process`'s group, up to `grace_s` seconds to exit, then SIGKILL to whatever of
    the group is still there (workers that ignored SIGTERM); returns once `process` is reaped.

    `process` must lead its group (`start_new_session=True`). Launchers such as torchrun (and
    accelerate, which runs it) pass SIGTERM on to workers they start in sessions of their own,
    out of reach of a signal to this group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        os.killpg(process.pid, signal.SIGCONT)  # a stopped (hung) process handles SIGTERM only once continued
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
