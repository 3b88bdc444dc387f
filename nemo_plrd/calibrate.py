"""Calibration: the second-moment statistics each slot's decomposition needs, streamed.

    column slot (dense or factored): input  x,             C = E[x x^T]  (in x in)
    row slot, dense:                 output y = W x,       C = E[y y^T]  (out x out)
    row slot, factored:              latent z = down(x),   C = E[z z^T]  (r x r)

Statistics are gathered one layer at a time from cached layer inputs: the calibration
batches run once up to the first transformer layer (a pre-hook records the exact keyword
arguments megatron's block passes its layers, then stops the forward), and each layer's
outputs become the next layer's inputs after that layer has been decomposed. So the
statistics of layer l flow through the already-decomposed layers 0..l-1 (as in LLM-ROM),
and the whole calibration costs a few forward passes instead of one per layer.

A second stream of layer inputs runs through the model as it was before this stage (the
target path). A column slot's input on that path, x_t, is kept for the current layer only
and paired token by token with the input x the slot sees now: the cross moment
K = E[x_t x^T] lets the decomposition aim at the target path's output instead of
reproducing the slot's own output on perturbed inputs, so the qkv and fc1 slots correct
the error the layers before them introduced. (Row slots stay on their own output
covariance: the same correction over projections of their output measured worse,
BENCHMARKS.md.)

Sums are accumulated in float64 and all-reduced over DP ranks (the stages give every rank the same tokens;
a caller may give each its own) and,
under sequence parallelism, over TP ranks too (each holds a slice of the sequence).
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional

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
    """Streams sum(a b^T) over the vectors (last dimension) of the pairs it is shown, b = a by default."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> None:
        rows = lambda t: t.detach().reshape(-1, t.shape[-1]).float()
        a_rows = rows(a)
        b_rows = a_rows if b is None else rows(b)
        gram = (a_rows.T @ b_rows).double()  # fp32 GEMM per batch, fp64 across batches
        self.total = gram if self.total is None else self.total + gram
        self.count += a_rows.shape[0]

    def covariance(self, sequence_parallel: bool) -> torch.Tensor:
        """E[a b^T] over every rank's tokens: DP ranks always, TP ranks when SP shards tokens."""
        stats = torch.cat([self.total.flatten(), self.total.new_tensor([self.count])])
        groups = [parallel_state.get_data_parallel_group()]
        if sequence_parallel:
            groups.append(parallel_state.get_tensor_model_parallel_group())
        for group in groups:
            dist.all_reduce(stats, group=group)
        return stats[:-1].view_as(self.total) / stats[-1]


class SlotStatistic(NamedTuple):
    """C = E[v v^T] of the tensor v the slot sees now; K = E[x_t x^T] against the target path's inputs."""

    cov: torch.Tensor
    cross: Optional[torch.Tensor] = None  # None: no target (row slots; or x_t = x)


SlotActivations = dict[str, list[torch.Tensor]]  # slot name -> its watched tensor, per batch


def _watch(slot: Slot, see: Callable[[torch.Tensor], None]):
    """Hook the tensor whose statistics this slot's decomposition needs."""
    module = slot.module
    if slot.kind == COLUMN:  # its input x
        return module.register_forward_pre_hook(lambda m, args: see(args[0]))
    if isinstance(module, LowRankRowParallelLinear):  # the reduced latent z = down(x)
        return module.down.register_forward_hook(lambda m, args, out: see(out[0]))
    return module.register_forward_hook(lambda m, args, out: see(out[0]))  # its output y


def _run_watching(layer: torch.nn.Module, slots: list[Slot], inputs: LayerInputs,
                  see: Callable[[Slot, torch.Tensor], None]) -> LayerInputs:
    handles = [_watch(slot, lambda t, slot=slot: see(slot, t)) for slot in slots]
    try:
        return run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()


def target_inputs(layer: torch.nn.Module, slots: list[Slot],
                  inputs: LayerInputs) -> tuple[SlotActivations, LayerInputs]:
    """Run ``layer`` on the target path: each column slot's input per batch, and the layer's outputs."""
    columns = [slot for slot in slots if slot.kind == COLUMN]
    seen: SlotActivations = {slot.name: [] for slot in columns}
    outputs = _run_watching(layer, columns, inputs, lambda slot, x: seen[slot.name].append(x.detach()))
    return seen, outputs


def slot_statistics(layer: torch.nn.Module, slots: list[Slot], inputs: LayerInputs,
                    targets: Optional[SlotActivations] = None) -> dict[str, SlotStatistic]:
    """Run ``layer`` on ``inputs``: each slot's statistic, keyed by slot name.

    ``targets`` (from ``target_inputs`` on the same batches): also the column slots' cross moments.
    """
    targets = targets or {}
    own = {slot.name: SecondMoment() for slot in slots}
    cross = {slot.name: SecondMoment() for slot in slots if slot.name in targets}
    batch = {name: 0 for name in cross}

    def see(slot: Slot, tensor: torch.Tensor) -> None:
        own[slot.name].add(tensor)
        if slot.name in cross:
            cross[slot.name].add(targets[slot.name][batch[slot.name]], tensor)
            batch[slot.name] += 1

    _run_watching(layer, slots, inputs, see)
    sp = layer.config.sequence_parallel
    return {name: SlotStatistic(own[name].covariance(sp), cross[name].covariance(sp) if name in cross else None)
            for name in own}
