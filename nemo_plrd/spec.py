"""megatron-core layer specs whose linear slots are low-rank.

A ``GPTModel`` built from ``low_rank_block_spec`` has ``LowRank*ParallelLinear`` layers in
the slots given a rank and megatron's dense layers in the others (rank ``None``: a slot at
or above its break-even rank is cheaper dense). Ranks may differ per layer: the block spec
holds one layer spec per layer.
"""

from __future__ import annotations

import copy
import functools
from typing import Mapping, Sequence, Union

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_plrd.cpu import TorchNorm
from nemo_plrd.layers import LOW_RANK_LAYERS
from nemo_plrd.slots import SLOTS, SlotRanks, check_slot_names, one_key_per_layer


def _sp_capable(norm):
    """megatron's torch norm refuses sequence parallelism; ours marks its grads instead."""
    return TorchNorm if norm is WrappedTorchNorm else norm


def spec_submodules(spec):
    """The submodules of a layer-spec entry: a ``ModuleSpec``'s, or the keyword of the
    ``functools.partial`` that megatron-core >= 0.17 uses for the MLP."""
    return spec.keywords["submodules"] if isinstance(spec, functools.partial) else spec.submodules


def low_rank_layer_spec(ranks: SlotRanks, normalization: str = "RMSNorm", qk_layernorm: bool = False,
                        qk_l2_norm: bool = False) -> ModuleSpec:
    """megatron's local GPT layer spec with each slot in ``ranks`` (rank not None) low-rank."""
    check_slot_names(ranks)
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm,
                                                  qk_l2_norm=qk_l2_norm))
    layer = spec.submodules
    layer.input_layernorm = _sp_capable(layer.input_layernorm)
    layer.pre_mlp_layernorm = _sp_capable(layer.pre_mlp_layernorm)
    for slot, rank in ranks.items():
        if rank is None:
            continue
        parent_name, kind = SLOTS[slot]
        parent = spec_submodules(getattr(layer, parent_name))
        setattr(parent, slot, ModuleSpec(module=LOW_RANK_LAYERS[kind], params={"rank": rank}))
    return spec


def low_rank_block_spec(
    config: TransformerConfig, ranks: Union[SlotRanks, Sequence[SlotRanks]]
) -> TransformerBlockSubmodules:
    """A decoder block spec: the same slot ranks in every layer, or one mapping per layer. Sets how ``config``'s
    model is checkpointed: with one key per layer where a slot is factored, as factor shapes may differ."""
    per_layer = [ranks] * config.num_layers if isinstance(ranks, Mapping) else list(ranks)
    if len(per_layer) != config.num_layers:
        raise ValueError(
            f"got slot ranks for {len(per_layer)} layers; the model has {config.num_layers}"
        )
    # the block spec holds every layer: a pipeline stage would build them all
    unsupported = {"pipeline_model_parallel_size > 1": config.pipeline_model_parallel_size > 1,
                   "num_moe_experts": config.num_moe_experts, "multi_latent_attention": config.multi_latent_attention}
    if any(unsupported.values()):
        raise ValueError(f"low-rank block specs support dense, single-stage models; the config sets "
                         f"{', '.join(name for name, value in unsupported.items() if value)}")
    specs = [low_rank_layer_spec(r, config.normalization, config.qk_layernorm, config.qk_l2_norm) for r in per_layer]
    config.hetereogenous_dist_checkpoint = one_key_per_layer(per_layer)
    # The final norm is the same class as the layers' own (SP-capable) norms.
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=specs[0].submodules.input_layernorm)
