"""The four linear slots of a megatron transformer layer, found by name (as peft matches modules).

column slots (input replicated, output sharded):  self_attention.linear_qkv, mlp.linear_fc1
row slots    (input sharded, output reduced):     self_attention.linear_proj, mlp.linear_fc2
Fused slots stay fused: qkv (interleaved per query group) and fc1 ([gate; up]) are
decomposed jointly, with one shared down factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch

from nemo_plrd.errors import InputError

COLUMN, ROW = "column", "row"
# slot name -> (attribute of the layer holding it, kind)
SLOTS = {
    "linear_qkv": ("self_attention", COLUMN),
    "linear_proj": ("self_attention", ROW),
    "linear_fc1": ("mlp", COLUMN),
    "linear_fc2": ("mlp", ROW),
}

SlotRanks = Mapping[str, Optional[int]]


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank at which a factor pair costs as many parameters and FLOPs as W itself: a slot factored at
    or above it is cheaper dense."""
    return out_features * in_features / (out_features + in_features)


def one_key_per_layer(ranks: Union[SlotRanks, Sequence[SlotRanks], None]) -> bool:
    """Whether a model of ``ranks`` (one mapping for every layer, or one per layer) is checkpointed with
    one key per layer: when it factors a slot, as factor shapes may differ between layers (megatron
    otherwise stacks a weight of all layers under one key, which a dense model keeps)."""
    per_layer = [] if ranks is None else [ranks] if isinstance(ranks, Mapping) else ranks
    return any(rank is not None for layer in per_layer for rank in layer.values())


def check_slot_names(names) -> None:
    unknown = sorted(set(names) - set(SLOTS))
    if unknown:
        raise InputError(f"unknown slot name(s) {unknown}; the slots are {list(SLOTS)}")


@dataclass
class Slot:
    """One slot of one layer: where it lives, so it can be read and replaced."""

    layer: int  # global layer index (0-based)
    name: str
    parent: torch.nn.Module

    @property
    def kind(self) -> str:
        return SLOTS[self.name][1]

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.parent, self.name)

    def replace(self, module: torch.nn.Module) -> None:
        setattr(self.parent, self.name, module)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer layers of a GPTModel, through DDP / Float16Module wrappers."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model.decoder.layers


def layer_slots(layer: torch.nn.Module) -> list[Slot]:
    """The slots of one TransformerLayer (megatron numbers layers from 1)."""
    return [Slot(layer.layer_number - 1, name, getattr(layer, parent))
            for name, (parent, _) in SLOTS.items()]
