"""Calibration: the second-moment statistics each slot's decomposition needs, streamed.

    column slot (dense or factored): input covariance   C   = E[x x^T]  (in x in)
    row slot, dense:                 output covariance  C_y = E[y y^T]  (out x out)
    row slot, factored:              latent covariance  C_z = E[z z^T]  (r x r), z = down(x)

Statistics are gathered one layer at a time from cached layer inputs: the calibration
batches run once up to the first transformer layer (a pre-hook records the exact keyword
arguments megatron's block passes its layers, then stops the forward), and each layer's
outputs become the next layer's inputs after that layer has been decomposed. So the
statistics of layer l flow through the already-decomposed layers 0..l-1 (as in LLM-ROM),
memory holds one layer's statistics at a time, and the whole calibration costs a few
forward passes instead of one per layer.

Sums are accumulated in float64 and all-reduced over DP ranks (different tokens) and,
under sequence parallelism, over TP ranks too (each holds a slice of the sequence).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plrd.layers import LowRankRowParallelLinear
from nemo_plrd.model import gpt_forward
from nemo_plrd.slots import COLUMN, Slot, decoder_layers

LayerInputs = list[dict]  # one dict of TransformerLayer keyword arguments per batch


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first layer needs to run."""


def capture_layer_inputs(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> LayerInputs:
    """The keyword arguments the first transformer layer receives, per batch of token ids."""
    captured: LayerInputs = []

    def hook(module, args, kwargs):
        captured.append({**kwargs, **({"hidden_states": args[0]} if args else {})})
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for tokens in batches:
                try:
                    gpt_forward(model, tokens)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: torch.nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Each batch through one layer: the next layer's inputs."""
    outputs = []
    with torch.no_grad():
        for kwargs in inputs:
            out = layer(**kwargs)
            outputs.append({**kwargs, "hidden_states": out[0] if isinstance(out, tuple) else out})
    return outputs


class SecondMoment:
    """Streams sum(v v^T) and the count of the vectors v (last dimension) it is shown."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, tensor: torch.Tensor) -> None:
        vectors = tensor.detach().reshape(-1, tensor.shape[-1]).float()
        gram = (vectors.T @ vectors).double()  # fp32 GEMM per batch, fp64 across batches
        self.total = gram if self.total is None else self.total + gram
        self.count += vectors.shape[0]

    def covariance(self, sequence_parallel: bool) -> torch.Tensor:
        """E[v v^T] over every rank's tokens: DP ranks always, TP ranks when SP shards tokens."""
        stats = torch.cat([self.total.flatten(), self.total.new_tensor([self.count])])
        groups = [parallel_state.get_data_parallel_group()]
        if sequence_parallel:
            groups.append(parallel_state.get_tensor_model_parallel_group())
        for group in groups:
            dist.all_reduce(stats, group=group)
        return stats[:-1].view_as(self.total) / stats[-1]


def _watch(slot: Slot, moment: SecondMoment):
    """Hook the tensor whose statistics this slot's decomposition needs."""
    module = slot.module
    if slot.kind == COLUMN:  # its input x
        return module.register_forward_pre_hook(lambda m, args: moment.add(args[0]))
    if isinstance(module, LowRankRowParallelLinear):  # the reduced latent z = down(x)
        return module.down.register_forward_hook(lambda m, args, out: moment.add(out[0]))
    return module.register_forward_hook(lambda m, args, out: moment.add(out[0]))  # its output y


def slot_statistics(layer: torch.nn.Module, slots: list[Slot], inputs: LayerInputs) -> dict[str, torch.Tensor]:
    """Run ``layer`` on ``inputs`` and return each slot's covariance, keyed by slot name."""
    moments = {slot.name: SecondMoment() for slot in slots}
    handles = [_watch(slot, moments[slot.name]) for slot in slots]
    try:
        run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    sequence_parallel = layer.config.sequence_parallel
    return {name: moment.covariance(sequence_parallel) for name, moment in moments.items()}
