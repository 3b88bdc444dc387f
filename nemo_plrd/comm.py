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
from dataclasses import dataclass
from typing import Callable, Iterator

import torch.distributed as dist

# Collective -> which positional argument holds the full (logical) tensor it moves:
# all-reduce its buffer, all-gather its output, reduce-scatter its input.
_FULL_TENSOR_ARG = {
    "all_reduce": 0,
    "all_gather_into_tensor": 0,
    "_all_gather_base": 0,
    "reduce_scatter_tensor": 1,
    "_reduce_scatter_base": 1,
    "broadcast": 0,
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
        index = _FULL_TENSOR_ARG[op]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            tensor = args[index]
            nbytes = tensor.numel() * tensor.element_size()
            self.calls.append(Collective(op, tuple(tensor.shape), nbytes, kwargs.get("group")))
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
