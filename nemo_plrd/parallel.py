"""Bring up torch.distributed and megatron-core's parallel state, on GPUs or on CPUs.

Under ``torchrun`` the process group comes from the environment; a plain ``python`` run
gets a one-process group, so the same code path serves a laptop, CI and a SLURM job.
CPU runs use gloo and ``enable_cpu_megatron``; GPU runs use NCCL.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from nemo_plrd.cpu import enable_cpu_megatron
from nemo_plrd.errors import InputError
from nemo_plrd.model import LlamaArch, check_tensor_parallel

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout: timedelta | None = None) -> None:
    """Start the default process group once per process (idempotent).

    ``timeout`` bounds every collective's wait (torch's default, 30 min for gloo, when None).
    """
    if dist.is_initialized():
        return
    # Not under torchrun: a group of one on a free local port. The environment is left alone, so
    # a process this one starts (a recipe run from a script or a test) makes its own group.
    alone = {} if "RANK" in os.environ else dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=timeout, **alone)
    else:
        enable_cpu_megatron()
        dist.init_process_group("gloo", timeout=timeout, **alone)


def init_model_parallel(tensor_parallel_size: int = 1, seed: int = 1234, key: str = "tensor_parallel_size") -> None:
    """(Re)build megatron's TP/DP groups for this world and seed its RNG tracker.

    Calling it again with another TP size tears the old groups down first, so one process
    group can run TP=1 and TP=2 one after the other (as the tests and the TP=2<->1
    checkpoint check do).
    """
    init_distributed()
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise InputError(
            f"{key}={tensor_parallel_size} must be >= 1 and divide the "
            f"world size {world}"
        )
    if parallel_state.model_parallel_is_initialized():
        _destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_tensor_parallel_over_world(arch: LlamaArch) -> None:
    """TP over every process the launcher started (the conversion scripts' layout), refused naming the
    launcher's flag, with which the user set the TP size."""
    init_distributed()
    check_tensor_parallel(arch, dist.get_world_size(), "torchrun --nproc_per_node")
    init_model_parallel(dist.get_world_size())


def _destroy_model_parallel() -> None:
    """Destroy the process groups megatron made, then forget them.

    megatron's ``destroy_model_parallel`` only drops its references (its gloo copies aside), so
    every rebuild leaked ~17 live groups, each with its own transport threads: after 20 rebuilds
    a CPU rank held ~1,000 threads that burnt 0.4 of a core while idle, and the TP test group
    ran several times slower towards its end. megatron records each group it made, for this
    rank, in ``_global_process_group_list`` (``None`` first, for the default group).
    """
    for group in parallel_state._global_process_group_list or []:
        if group is not None:
            dist.destroy_process_group(group)
    parallel_state.destroy_model_parallel()  # skips the gloo groups destroyed above


def tp_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over the TP group (a new tensor): the ``reduce`` of nemo_plrd.decompose."""
    total = tensor.clone()
    dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total


def rank0_decides(decide: Callable[[], T]) -> T:
    """``decide()`` as rank 0 computes it, on every rank (one broadcast of a small object).

    A file-system check that each rank makes for itself can split the group: a rank that
    looks late sees what rank 0 has meanwhile written (or a stale network-file-system
    cache), takes another branch, and the other ranks wait forever in the next collective.
    One rank looks; every rank gets its answer.
    """
    if not dist.is_initialized():
        return decide()
    answer = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(answer, src=0)
    return answer[0]


def exists_on_rank0(path: Path) -> bool:
    """Whether ``path`` exists, as rank 0 sees it, on every rank."""
    return rank0_decides(path.exists)
