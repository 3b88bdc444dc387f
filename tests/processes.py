"""Killing a launched run as a lost machine would: every process it started, at once."""

import os
import signal
import subprocess
import time

import psutil


def kill_everything(pid: int) -> None:
    """SIGKILL the process groups of ``pid`` and of all its descendants.

    torchrun starts each worker in a session of its own (torch.distributed.elastic's
    subprocess handler), so killing the launcher's group alone leaves the ranks training,
    and each rank's checkpoint writers sit in the rank's group.
    """
    root = psutil.Process(pid)
    groups = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_when(process: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL the run (every process it started) as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the point it was to be killed at"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    kill_everything(process.pid)
    process.wait()
