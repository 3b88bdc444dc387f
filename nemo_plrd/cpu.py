"""Let megatron-core run on a CPU-only torch build.

megatron-core assumes CUDA in a handful of places that are not about the math: buffers
allocated on ``torch.cuda.current_device()``, ``torch.cuda.synchronize()`` before
checkpoint I/O, the CUDA RNG tracker behind tensor-parallel dropout and initialisation,
the default causal mask (built with ``device="cuda"``), the current stream (waited on
before gradient reduction since megatron-core 0.17), a torch norm that refuses
sequence parallelism, and the optimizer's scalars and norms (``torch.tensor(...,
device="cuda")`` in ``megatron.core.optimizer`` and ``utils``, and checks that gradients
are ``torch.cuda.FloatTensor``). ``enable_cpu_megatron`` points each
of these at the CPU, and only when CUDA is absent, so the product and its tests run the
very same megatron code paths (gloo backend) on a laptop or CI machine that a GPU job runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Iterator, Optional

import torch

_ENABLED = False


class CpuRNGStatesTracker:
    """The CUDA RNG tracker's contract (named states, ``fork``) on the CPU generator.

    megatron forks a named state around tensor-parallel dropout and weight init so that
    TP ranks draw different (or identical) numbers on purpose; here the states are CPU
    generator states swapped in and out of the default generator.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already tracked")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class TorchNorm:
    """megatron's ``WrappedTorchNorm`` without its refusal of sequence parallelism.

    Under sequence parallelism each TP rank normalises only its own tokens, so the norm's
    weight gradient is a partial sum; the ``sequence_parallel`` attribute makes megatron's
    ``finalize_model_grads`` all-reduce it over TP, exactly as it does for TE/apex norms.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported; use one of {sorted(norms)}"
            )
        norm = norms[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


@functools.lru_cache
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """megatron's ``get_default_causal_mask`` (True above the diagonal = masked), on the CPU."""
    return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)


# The modules whose ``torch.tensor`` / ``torch.zeros`` calls ask for device="cuda" outright.
_CUDA_FACTORY_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
)


def _cuda_on_cpu(make):
    """A tensor factory (``torch.tensor``, ``torch.zeros``, ...) that makes its "cuda" tensors on the CPU."""

    @functools.wraps(make)
    def on_cpu(*args, device=None, **kwargs):
        cuda = device is not None and torch.device(device).type == "cuda"
        return make(*args, device="cpu" if cuda else device, **kwargs)

    return on_cpu


class TorchOnCpu(types.ModuleType):
    """``torch`` as one module sees it: everything torch's, but the factories put "cuda" tensors on
    the CPU, and ``torch.cuda`` may be a stand-in (``cuda``) for that module's CUDA calls."""

    FACTORIES = {name: _cuda_on_cpu(getattr(torch, name)) for name in ("tensor", "zeros", "ones", "empty",
                                                                      "rand", "randn")}

    def __init__(self, cuda: Optional[types.ModuleType] = None) -> None:
        super().__init__("torch")
        if cuda is not None:
            self.cuda = cuda

    def __getattr__(self, name: str):
        return self.FACTORIES.get(name) or getattr(torch, name)


def _cuda_type_name(type_method):
    """``Tensor.type()`` naming a CPU tensor as its CUDA twin ("torch.cuda.FloatTensor"): megatron's
    optimizer asserts that name for fp32 gradients; with an argument, ``type`` converts as before."""

    @functools.wraps(type_method)
    def type_(self, *args, **kwargs):
        name = type_method(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    return type_


class _CpuStream:
    """The current "stream" on the CPU: everything already happened in order, nothing to wait for."""

    def wait_event(self, event) -> None:  # what megatron's gradient sync asks of it
        pass


def enable_cpu_megatron() -> bool:
    """Patch megatron-core's CUDA assumptions when CUDA is absent; returns whether it did.

    Idempotent and a no-op on a machine with CUDA, so library code may call it freely.
    """
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mcore_random

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    # initialize_rng_tracker() looks the class up by this name when it builds the tracker.
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random.initialize_rng_tracker(force_reset=True)
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    on_cpu = TorchOnCpu()
    for name in _CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = on_cpu
    torch.Tensor.type = _cuda_type_name(torch.Tensor.type)
    _ENABLED = True
    return True
