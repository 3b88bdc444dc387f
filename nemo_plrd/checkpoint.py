"""megatron ``dist_checkpointing`` save/load of a model, resharding across TP sizes.

A checkpoint written at one TP size loads at any other: each parameter is saved with its
global shape and this rank's fragment (``sharded_state_dict``), replicated factors once.
Writes go to ``<dir>.partial`` and are renamed into place only after every rank finished,
so an interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"checkpoint directory {path} already exists; choose a new path")
    partial = path.with_name(path.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        partial.rename(path)
    dist.barrier()
    return path


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a megatron dist_checkpointing checkpoint")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state)
