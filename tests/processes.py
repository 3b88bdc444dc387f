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
    processes = [root, *root.children(recursive=True)]
    groups = set()
    for process in processes:
        try:
            groups.add(os.getpgid(process.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # gone, not dying: a rerun must not meet a killed rank still holding a lock or writing a file
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"still running 30 s after SIGKILL: {alive}"


def kill_when(process: subprocess.Popen, ready, timeout: float = 600) -> None:
    """SIGKILL the run (every process it started) as soon as ``ready()`` holds; whatever happens (the
    run ends first, the deadline passes, ``ready`` raises), nothing it started is left running."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, "the run ended before the point it was to be killed at"
            assert time.monotonic() < deadline, f"not ready to be killed after {timeout} s"
            time.sleep(0.05)
    finally:
        kill_everything(process.pid)
        process.wait()
