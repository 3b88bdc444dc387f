"""Apply a rank plan to a megatron GPTModel in place: decompose dense slots, re-truncate factored ones.

``PLRDTransform`` has the shape of a Megatron-Bridge pre-wrap hook (list of model chunks in,
the same list out), so a recipe registers it after the HF weight-loading hook and the model
that reaches DDP and the optimizer is already factored. Each planned slot is swapped for
its ``LowRank*ParallelLinear`` built with the slot's own megatron arguments; the factors
come from ``nemo_plrd.decompose`` (gather-free: each rank decomposes its own shard and the
only communication is one all-reduce of a square statistic per slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from tqdm import tqdm

from nemo_plrd import decompose
from nemo_plrd.calibrate import SlotStatistic, capture_layer_inputs, run_layer, slot_statistics, target_inputs
from nemo_plrd.errors import InputError
from nemo_plrd.layers import LOW_RANK_LAYERS, mark_split_weights
from nemo_plrd.parallel import rank0_decides, tp_sum
from nemo_plrd.model import parameter_count
from nemo_plrd.plan import RankPlan, SlotPlan, plan_ranks
from nemo_plrd.slots import COLUMN, ROW, Slot, decoder_layers, layer_slots, one_key_per_layer

DENSE_LAYERS = {COLUMN: ColumnParallelLinear, ROW: RowParallelLinear}

METHODS = ("activation", "svd")
# Ridge of the column slots' calibrated statistics (``nemo_plrd.decompose``): chosen on
# validation text, 60% of SmolLM2-135M's slot parameters, 8k calibration tokens (bench/ridge_sweep.py).
RIDGE = 1e-2


def current_rank(module: torch.nn.Module) -> Optional[int]:
    """The rank of a factored slot, None for a dense one."""
    return getattr(module, "rank", None)


def model_ranks(model: torch.nn.Module) -> list[dict[str, Optional[int]]]:
    """Per layer, {slot: rank or None (dense)}: what ``build_gpt`` takes to rebuild the model."""
    return [{slot.name: current_rank(slot.module) for slot in layer_slots(layer)} for layer in decoder_layers(model)]


def slot_shape(slot: Slot) -> tuple[int, int]:
    module = slot.module
    return module.output_size, module.input_size


def check_slots_supported(model: torch.nn.Module) -> None:
    """Refuse, before any work, a slot this transform would decompose wrong.

    Transformer Engine's spec (Megatron-Bridge's default) fuses each block's input norm into
    ``linear_qkv`` and the pre-MLP norm into ``linear_fc1`` (``TELayerNormColumnParallelLinear``,
    with the norm's weight as ``layer_norm_weight``); swapping such a slot for a low-rank one
    would drop the norm. Supported: megatron's local ``Column/RowParallelLinear`` and the
    low-rank layers, which is what ``nemo_plrd.spec`` builds.
    """
    for layer in decoder_layers(model):
        for slot in layer_slots(layer):
            module, kind = slot.module, type(slot.module).__name__
            if hasattr(module, "layer_norm_weight"):
                raise InputError(
                    f"layer {slot.layer} {slot.name} is a {kind}: its input norm is fused inside the linear layer "
                    "(Transformer Engine's layer spec), and replacing the slot would drop the norm. Build the model "
                    "with separate norms and local linears (nemo_plrd.spec.low_rank_block_spec, or a provider with "
                    "transformer_layer_spec=get_gpt_layer_local_spec) before PLRD decomposes it")
            if not isinstance(module, (DENSE_LAYERS[slot.kind], LOW_RANK_LAYERS[slot.kind])):
                raise InputError(f"layer {slot.layer} {slot.name} is a {kind}, which PLRD cannot decompose; supported: "
                                 f"{DENSE_LAYERS[slot.kind].__name__} and {LOW_RANK_LAYERS[slot.kind].__name__}")


def check_plan_fits(model: torch.nn.Module, plan: RankPlan) -> None:
    """Refuse, before any work, a plan made for another model or one asking the impossible."""
    check_slots_supported(model)
    layers = decoder_layers(model)
    if plan.num_layers != len(layers):
        raise InputError(f"the plan has {plan.num_layers} layers; the model has {len(layers)}")
    slots = {(slot.layer, slot.name) for layer in layers for slot in layer_slots(layer)}
    planned = {(slot.layer, slot.slot) for slot in plan.slots}
    if planned != slots:
        raise InputError(f"the plan does not cover the model's slots (layer, slot): missing {sorted(slots - planned)}, "
                         f"not in the model {sorted(planned - slots)}")
    for layer in layers:
        for slot in layer_slots(layer):
            planned, now = plan.rank(slot.layer, slot.name), current_rank(slot.module)
            shape = next(s for s in plan.slots if (s.layer, s.slot) == (slot.layer, slot.name))
            if (shape.out_features, shape.in_features) != slot_shape(slot):
                raise InputError(f"layer {slot.layer} {slot.name}: the plan says "
                                 f"{shape.out_features}x{shape.in_features}, the model has "
                                 f"{slot_shape(slot)[0]}x{slot_shape(slot)[1]}")
            if now is not None and (planned is None or planned > now):
                raise InputError(f"layer {slot.layer} {slot.name} has rank {now}; a plan can only "
                                 f"lower it (asked: {'dense' if planned is None else planned})")


def _factor(slot: Slot, rank: int, stat: Optional[SlotStatistic], solver: str,
            ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) local shards for ``slot`` at ``rank`` from its weights and statistic (None: plain SVD)."""
    module, factored = slot.module, current_rank(slot.module) is not None
    if slot.kind == COLUMN:
        calibrated = {} if stat is None else dict(input_cov=stat.cov, cross_cov=stat.cross, ridge=ridge)
        if factored:
            return decompose.column_retruncate(module.up.weight.detach(), module.down.weight.detach(), rank,
                                               reduce=tp_sum, **calibrated)
        return decompose.column_factors(module.weight.detach(), rank, reduce=tp_sum, solver=solver, **calibrated)
    cov = None if stat is None else stat.cov
    if factored:
        return decompose.row_retruncate(module.up.weight.detach(), module.down.weight.detach(), rank,
                                        latent_cov=cov, reduce=tp_sum)
    return decompose.row_factors(module.weight.detach(), rank, output_cov=cov, reduce=tp_sum, solver=solver)


def _merged_shard(slot: Slot) -> torch.Tensor:
    """This rank's shard of the slot's W, sharded as the dense weight is (factored: multiplied out)."""
    module = slot.module
    if current_rank(module) is None:
        return module.weight.detach()
    return module.up.weight.detach() @ module.down.weight.detach()


def _spectrum(slot: Slot, stat: Optional[SlotStatistic], ridge: float) -> torch.Tensor:
    cov = None if stat is None else stat.cov
    if slot.kind == COLUMN:
        return decompose.column_spectrum(_merged_shard(slot), input_cov=cov, reduce=tp_sum, ridge=ridge)
    if cov is not None and current_rank(slot.module) is not None:  # C_y = up C_z up^T
        up = slot.module.up.weight.detach().double()
        cov = up @ cov @ up.T
    return decompose.row_spectrum(_merged_shard(slot), output_cov=cov, reduce=tp_sum)


def slot_spectra(model: torch.nn.Module, calibration: Iterable[torch.Tensor] = (),
                 method: str = "activation", progress: bool = True, ridge: float = RIDGE) -> list[dict[str, torch.Tensor]]:
    """Per layer, each slot's output-energy spectrum (descending) under ``method``'s objective (with the
    ``ridge`` the decomposition will use).

    What ``allocation="spectrum"`` plans by. One pass through the model as it is now, so
    every slot's spectrum is measured before any slot changes.
    """
    check_options(method)
    activation = method == "activation"
    inputs = _layer_inputs(model, calibration) if activation else []
    spectra = []
    for layer in tqdm(decoder_layers(model), desc="spectra", unit="layer", disable=not progress):
        slots = layer_slots(layer)
        stats = slot_statistics(layer, slots, inputs) if activation else {}
        spectra.append({slot.name: _spectrum(slot, stats.get(slot.name), ridge) for slot in slots})
        if activation:
            inputs = run_layer(layer, inputs)
    return spectra


def plan_for(model: torch.nn.Module, calibration: Iterable[torch.Tensor] = (), method: str = "activation",
             allocation: str = "uniform", spectra: Optional[list] = None, ridge: float = RIDGE,
             **request) -> RankPlan:
    """``plan_ranks`` for this model: its slot shapes, other parameters and (measured unless given) spectra.

    ``request``: one of ranks=, keep=, target_params= (and multiple=), as ``plan_ranks`` takes.
    """
    check_slots_supported(model)
    mark_split_weights(model)  # the other parameters are counted across TP
    slots = [layer_slots(layer) for layer in decoder_layers(model)]
    shapes = [{slot.name: slot_shape(slot) for slot in layer} for layer in slots]
    slot_params = sum(SlotPlan(0, slot.name, *slot_shape(slot), current_rank(slot.module)).params
                      for layer in slots for slot in layer)
    if allocation == "spectrum" and spectra is None and request.get("ranks") is None:  # explicit ranks need none
        spectra = slot_spectra(model, calibration, method, ridge=ridge)
    plan = plan_ranks(shapes, other_params=parameter_count(model) - slot_params, allocation=allocation,
                      spectra=spectra, max_ranks=model_ranks(model), **request)
    return rank0_decides(lambda: plan)  # one plan on every rank, whatever a near-tie in the spectra did elsewhere


def check_options(method: str, solver: str = "exact", ridge: float = RIDGE) -> None:
    if method not in METHODS:
        raise InputError(f"method={method!r} is not one of {METHODS}")
    if solver not in decompose.SOLVERS:
        raise InputError(f"solver={solver!r} is not one of {decompose.SOLVERS}")
    if not 0 <= ridge < math.inf:
        raise InputError(f"ridge={ridge!r} must be a number >= 0 (a fraction of the mean input variance)")


def _layer_inputs(model: torch.nn.Module, calibration: Iterable[torch.Tensor]):
    inputs = capture_layer_inputs(model, calibration)
    if not inputs:
        raise InputError("method='activation' needs calibration batches")
    return inputs


def _low_rank_module(slot: Slot, rank: int, up: torch.Tensor, down: torch.Tensor) -> torch.nn.Module:
    """The slot's low-rank replacement, built with the slot's own megatron arguments and bias.

    Dense megatron layers and ours expose the same attributes, so either can be replaced.
    """
    old = slot.module
    # stride 2: a gated fc1's rows are [gate_i; up_i] per rank (megatron's MLP builds it so), which its
    # checkpoint layout needs to know; megatron-core < 0.19 leaves an uninitialised dense weight unmarked.
    stride = getattr(old, "stride", None) or (2 if slot.name == "linear_fc1" and old.config.gated_linear_unit else 1)
    kind_args = (dict(gather_output=old.gather_output, stride=stride) if slot.kind == COLUMN
                 else dict(input_is_parallel=old.input_is_parallel))
    new = LOW_RANK_LAYERS[slot.kind](
        old.input_size, old.output_size, rank=rank, config=old.config,
        init_method=lambda weight: None,  # the factors are copied in below
        bias=old.bias is not None, skip_bias_add=old.skip_bias_add, is_expert=old.is_expert,
        tp_group=old.tp_group, **kind_args,
    ).to(up.device)
    with torch.no_grad():
        new.up.weight.copy_(up)
        new.down.weight.copy_(down)
        if old.bias is not None:
            new.up.bias.copy_(old.bias)
    return new


def apply_plan(
    model: torch.nn.Module,
    plan: RankPlan,
    calibration: Iterable[torch.Tensor] = (),
    method: str = "activation",
    progress: bool = True,
    solver: str = "exact",
    ridge: float = RIDGE,
) -> torch.nn.Module:
    """Bring every slot of ``model`` to its planned rank, in place; returns the model.

    ``calibration``: batches of token ids [b, s], needed by ``method="activation"``.
    ``solver``: "exact" or "randomized" top eigenvectors of dense slots (``nemo_plrd.decompose``).
    ``ridge``: of the column slots' calibrated objective (``nemo_plrd.decompose``).
    Within a layer the attention slots go first, so the MLP's statistics already flow
    through the decomposed attention; the column slots aim at the outputs they had in the
    model as it was before this call (the target path, see ``nemo_plrd.calibrate``).
    """
    check_options(method, solver, ridge)
    check_plan_fits(model, plan)
    activation = method == "activation"
    inputs = _layer_inputs(model, calibration) if activation else []
    targets = inputs  # the target path's layer inputs; equal to ``inputs`` up to the first change

    layers = decoder_layers(model)
    for layer in tqdm(layers, desc=f"decompose ({method})", unit="layer", disable=not progress):
        slots = layer_slots(layer)
        if activation:
            target_slots, next_targets = target_inputs(layer, slots, targets)  # before the layer changes
        for group in (slots[:2], slots[2:]):  # attention (qkv, proj), then MLP (fc1, fc2)
            todo = [s for s in group if plan.rank(s.layer, s.name) not in (None, current_rank(s.module))]
            if not todo:
                continue
            stats = slot_statistics(layer, todo, inputs, target_slots) if activation else {}
            for slot in todo:
                rank = plan.rank(slot.layer, slot.name)
                up, down = _factor(slot, rank, stats.get(slot.name), solver, ridge)
                slot.replace(_low_rank_module(slot, rank, up, down))
        if activation:
            inputs, targets = run_layer(layer, inputs), next_targets
    layers[0].config.hetereogenous_dist_checkpoint = one_key_per_layer(plan.layer_ranks())
    return model


@dataclass
class PLRDTransform:
    """A Megatron-Bridge pre-wrap hook: ``provider.register_pre_wrap_hook(PLRDTransform(...))``."""

    plan: RankPlan
    calibration: Callable[[], Iterable[torch.Tensor]] = lambda: ()
    method: str = "activation"
    solver: str = "exact"
    ridge: float = RIDGE

    def __post_init__(self) -> None:
        check_options(self.method, self.solver, self.ridge)

    def __call__(self, model: list[torch.nn.Module]) -> list[torch.nn.Module]:
        if len(model) != 1:
            raise InputError(f"PLRD needs the whole model in one chunk (got {len(model)}: "
                             "virtual pipeline stages are not supported yet)")
        mark_split_weights(model[0])  # a model built to have its weights loaded, as a Bridge stage's
        apply_plan(model[0], self.plan, self.calibration(), self.method, solver=self.solver, ridge=self.ridge)
        return model
