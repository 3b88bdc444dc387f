"""Helpers for tests that run in the 2-process torchrun group."""

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def tp_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim)


def tp_chunk(t: torch.Tensor, dim: int) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return t.chunk(tp, dim)[parallel_state.get_tensor_model_parallel_rank()]


def shared_tmp(tmp_path_factory, name: str) -> str:
    """One directory for both ranks (each rank's tmp_path differs)."""
    path = [str(tmp_path_factory.mktemp(name)) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]
