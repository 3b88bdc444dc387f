"""Test-only CPU stand-ins that let Megatron-Bridge's real ``pretrain`` run on a CPU-only torch (gloo).

Never import this from product code. ``install()`` applies everything, idempotently, and
must run before anything imports ``megatron.bridge``. Each stand-in covers a CUDA,
Transformer Engine, nvidia-resiliency-ext or Python-3.12 gap only; Bridge's own logic runs
unchanged. megatron-core's optimizer / RNG-tracker / causal-mask / stream gaps are covered
by the product's ``nemo_plrd.cpu.enable_cpu_megatron`` (called from here), not repeated.
Line numbers: megatron-bridge 0.6.2, megatron-core 0.19.2.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
import typing

import torch

from nemo_plrd.cpu import TorchOnCpu, enable_cpu_megatron

_INSTALLED = False


# ---------------------------------------------------------------- import-time gaps


def typing_override() -> None:
    # megatron/training/models/{gpt,hybrid}.py use typing.override (Python 3.12); 3.11 lacks it.
    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


class _StubType(type):
    """Any attribute of a stub class is another stub class (enough for annotations)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _StubType(name, (), {})


def _stub_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StubType(attr, (), {})

    module.__getattr__ = __getattr__
    return module


def _import_with_stubs(stub_names: tuple[str, ...], module: str) -> None:
    """Import ``module`` while ``stub_names`` exist in sys.modules, then remove them again,
    so every other ``import transformer_engine`` / ``nvidia_resiliency_ext`` still fails (HAVE_TE False)."""
    if module in sys.modules:
        return
    saved = {name: sys.modules.get(name) for name in stub_names}
    for name in stub_names:
        sys.modules[name] = _stub_module(name)
    try:
        importlib.import_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def transformer_engine_import_in_lora_layers() -> None:
    # megatron/bridge/peft/lora_layers.py:20 imports transformer_engine.pytorch unguarded (annotations only).
    import megatron.core.transformer  # noqa: F401  (megatron-core probes for TE first, without the stub)
    from megatron.core.utils import get_te_version

    get_te_version()  # cache "0.0.0" before the stub exists, so megatron-core keeps its non-TE paths
    _import_with_stubs(("transformer_engine", "transformer_engine.pytorch"), "megatron.bridge.peft.lora_layers")


def nvrx_import_in_pretrain() -> None:
    # megatron/bridge/training/pretrain.py:19 imports nvidia_resiliency_ext.inprocess.CallWrapper
    # unguarded (annotation only); its last cp311 wheel breaks megatron-core, so it cannot be installed.
    _import_with_stubs(("nvidia_resiliency_ext", "nvidia_resiliency_ext.inprocess"),
                       "megatron.bridge.training.pretrain")


# ---------------------------------------------------------------- run-time CUDA gaps


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as one Bridge module sees it: only the named functions differ."""

    def __init__(self, **overrides) -> None:
        super().__init__("torch.cuda")
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


def _point_torch_at_cpu(module_name: str, cuda: types.ModuleType | None = None) -> None:
    importlib.import_module(module_name).torch = TorchOnCpu(cuda)


def cuda_tensor_factories() -> None:
    # torch.tensor / zeros / rand(..., device="cuda") in Bridge's and megatron-core's training loop:
    # bridge data/loaders.py:250,406, training/setup.py:281, training/checkpointing.py:326,
    # training/train.py:1461, training/eval.py:314, training/utils/train_utils.py:381-486,769,1210,
    # core pipeline_parallel/schedules.py:749,1121,2292. (train.py:1461 = exit_duration_in_mins and
    # eval.py:314 = evaluation: on that path, not exercised by the probe's runs.)
    for name in (
        "megatron.bridge.data.loaders",
        "megatron.bridge.training.setup",
        "megatron.bridge.training.train",
        "megatron.bridge.training.eval",
        "megatron.bridge.training.utils.train_utils",
        "megatron.core.pipeline_parallel.schedules",
    ):
        _point_torch_at_cpu(name)


def cuda_rng_state_in_checkpointing() -> None:
    # bridge training/checkpointing.py:491 saves torch.cuda.get_rng_state() and 3155/3167 restore it;
    # there is no CUDA generator: save an empty state, restore nothing (the CPU state is saved beside it).
    cuda = _CudaOnCpu(get_rng_state=lambda *a, **k: torch.empty(0, dtype=torch.uint8),
                      set_rng_state=lambda *a, **k: None)
    _point_torch_at_cpu("megatron.bridge.training.checkpointing", cuda)


def cuda_in_initialize() -> None:
    # bridge training/initialize.py: _warmup_jit_function draws torch.rand(device="cuda") (895-944) and
    # empties the CUDA cache (955); _set_random_seed (869) seeds megatron's model-parallel RNG tracker only
    # when torch.cuda.device_count() > 0 (else layers fail: "RNG state 'model-parallel-rng' was never
    # added"), and _initialize_distributed (706-723) then calls torch.cuda.set_device: one CPU stands in
    # for one device, the tracker itself is nemo_plrd.cpu's CPU tracker.
    cuda = _CudaOnCpu(device_count=lambda: 1, set_device=lambda *a, **k: None,
                      empty_cache=lambda: None)
    _point_torch_at_cpu("megatron.bridge.training.initialize", cuda)


def initialize_megatron_cuda_assert() -> None:
    # bridge training/initialize.py:89-91 asserts CUDA unless allow_no_cuda; setup.py:253 never passes it.
    from megatron.bridge.training import initialize, setup

    if not getattr(setup.initialize_megatron, "_cpu_shim", False):
        wrapped = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
        wrapped._cpu_shim = True
        setup.initialize_megatron = wrapped


def compile_helpers() -> None:
    # bridge training/initialize.py:147 runs megatron's compile_helpers() (`make` in the package dir),
    # which fails from a wheel; the cp311 wheel ships helpers_cpp prebuilt, so only check it loads.
    from megatron.bridge.training import initialize

    def helpers_prebuilt() -> None:
        importlib.import_module("megatron.core.datasets.helpers_cpp")

    initialize.compile_helpers = helpers_prebuilt


@contextlib.contextmanager
def _cuda_moves_stay_on_cpu():
    """Inside: ``Tensor.cuda()`` / ``Module.cuda()`` return what they got (there is no device to move to)."""
    tensor_cuda, module_cuda = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = tensor_cuda, module_cuda


def _during(module_name: str, function: str) -> None:
    module = importlib.import_module(module_name)
    original = getattr(module, function)
    if getattr(original, "_cpu_shim", False):
        return

    @functools.wraps(original)
    def on_cpu(*args, **kwargs):
        with _cuda_moves_stay_on_cpu():
            return original(*args, **kwargs)

    on_cpu._cpu_shim = True
    setattr(module, function, on_cpu)


class _NoStream:
    """A CUDA stream on the CPU: work already ran in order, there is nothing to wait for."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass


def cuda_streams_in_ddp_wrap() -> None:
    # megatron/training/models/dist_utils.py:303-366 (_ddp_wrap, called by bridge get_model) builds DDP on
    # a side torch.cuda.Stream() and syncs it with the current stream.
    cuda = _CudaOnCpu(Stream=_NoStream, current_stream=lambda *a, **k: _NoStream(),
                      stream=lambda stream: contextlib.nullcontext())
    _point_torch_at_cpu("megatron.training.models.dist_utils", cuda)


def module_cuda_in_get_model() -> None:
    # bridge models/model_provider.py:689 moves each chunk with model_module.cuda(); 646 forces
    # use_cpu_initialization=False, so that branch is always taken. Scoped to get_model's call.
    _during("megatron.bridge.models.model_provider", "get_model")


def tensor_cuda_in_gpt_step() -> None:
    # bridge training/gpt_step.py:266 moves each batch tensor with val.cuda(non_blocking=True).
    _during("megatron.bridge.training.gpt_step", "get_batch_from_iterator")


def install() -> None:
    """Apply every stand-in (idempotent); a no-op where CUDA exists."""
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    typing_override()
    transformer_engine_import_in_lora_layers()
    nvrx_import_in_pretrain()
    enable_cpu_megatron()  # megatron-core's optimizer, RNG tracker, causal mask, current stream
    cuda_tensor_factories()
    cuda_rng_state_in_checkpointing()
    cuda_in_initialize()
    initialize_megatron_cuda_assert()
    compile_helpers()
    cuda_streams_in_ddp_wrap()
    module_cuda_in_get_model()
    tensor_cuda_in_gpt_step()
    _INSTALLED = True
