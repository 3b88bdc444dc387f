"""Count the bytes of every torch.distributed collective issued inside a ``with`` block.

megatron calls collectives both as ``torch.distributed.all_reduce`` and through aliases
bound at import (``dist_all_gather_func`` in ``tensor_parallel.mappings`` and ``.layers``),
so the meter swaps every reference to the original function it finds, by identity, in
``torch.distributed`` and in those modules, and restores them on exit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch.distributed as dist

# Collective -> the argument holding the full (logical) data it moves: all-reduce its buffer, all-gather its
# output, reduce-scatter and all-to-all their input (a tensor, or a list of one tensor per rank).
_FULL_TENSOR_ARG = {
    "all_reduce": "tensor",
    "broadcast": "tensor",
    "all_gather_into_tensor": "output_tensor",
    "_all_gather_base": "output_tensor",
    "all_gather": "tensor_list",
    "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input",
    "reduce_scatter": "input_list",
    "all_to_all_single": "input",
}
_ALIAS_MODULES = (
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.utils",
    "megatron.core.distributed.finalize_model_grads",
)


@dataclass(frozen=True)
class Collective:
    op: str
    shape: tuple[int, ...]
    nbytes: int
    group: object  # the ProcessGroup it ran on (None: the default group)


class CollectiveMeter:
    """Records each collective's op, tensor shape, size and group."""

    def __init__(self) -> None:
        self.calls: list[Collective] = []

    def on(self, group) -> list[Collective]:
        """The collectives that ran on ``group``."""
        return [c for c in self.calls if c.group is group]

    def total_bytes(self, group=None) -> int:
        """Bytes of all collectives, or of those on ``group`` only."""
        return sum(c.nbytes for c in (self.calls if group is None else self.on(group)))

    def _counting(self, op: str, fn: Callable) -> Callable:
        signature = inspect.signature(fn)  # the group and the data, passed by position or by keyword

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            data = bound[_FULL_TENSOR_ARG[op]]
            parts = data if isinstance(data, (list, tuple)) else [data]
            shape = tuple(data.shape) if parts is not data else (len(parts), *parts[0].shape)
            nbytes = sum(part.numel() * part.element_size() for part in parts)
            self.calls.append(Collective(op, shape, nbytes, bound.get("group")))
            return fn(*args, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def measure(self) -> Iterator["CollectiveMeter"]:
        wrappers = {  # id(original function) -> counting wrapper
            id(getattr(dist, op)): self._counting(op, getattr(dist, op))
            for op in _FULL_TENSOR_ARG
            if hasattr(dist, op)
        }
        namespaces = [dist] + [importlib.import_module(m) for m in _ALIAS_MODULES]
        swapped = []
        for namespace in namespaces:
            for name, value in list(vars(namespace).items()):
                if id(value) in wrappers:
                    setattr(namespace, name, wrappers[id(value)])
                    swapped.append((namespace, name, value))
        try:
            yield self
        finally:
            for namespace, name, value in swapped:
                setattr(namespace, name, value)
