"""A LLaMA-family decoder whose linear layers are low-rank factor pairs: the factored HF export.

Saved next to the weights and named in ``config.json``'s ``auto_map``, so the directory loads
with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and needs nothing
but torch and transformers. It keeps the fusion of the megatron model it was exported from:
one ``qkv_proj`` ([q; k; v] rows) and one ``gate_up_proj`` ([gate; up] rows), so each fused
slot's shared ``down`` factor runs once per forward. A slot whose planned rank is ``None``
stays an ``nn.Linear``. Everything else (norms, rotary embedding, attention kernels, cache,
generation) is transformers' own LLaMA code.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as llama


class PLRDLlamaConfig(LlamaConfig):
    """LlamaConfig plus the rank of every slot: ``plrd_ranks[layer][slot]`` (None: dense)."""

    model_type = "plrd_llama"

    def __init__(self, plrd_ranks: list[dict] | None = None, qkv_bias: bool = False, **kwargs):
        self.plrd_ranks = plrd_ranks or []
        self.qkv_bias = qkv_bias  # Qwen2: bias on q, k, v only (LLaMA's attention_bias also biases o)
        super().__init__(**kwargs)


class LowRankLinear(nn.Module):
    """y = up(down(x)): down is rank x in, up is out x rank (with the layer's bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def linear(in_features: int, out_features: int, rank: int | None, bias: bool = False) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias) if rank is None else LowRankLinear(
        in_features, out_features, rank, bias)


class Columns(nn.Module):
    """Columns [start, stop) of the fused qkv projection's output, in place of a q/k/v projection."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return qkv[..., self.start:self.stop]


class PLRDAttention(llama.LlamaAttention):
    """transformers' own LLaMA attention, run over the output of one fused (low-rank) qkv projection.

    ``forward`` hands that output to ``LlamaAttention.forward`` as its hidden states, and the q, k and
    v projections it calls become column slices. So the cache, the attention kernels and their keyword
    arguments stay transformers' code in every release: a copied forward silently lost the KV cache
    when transformers 5.24 renamed ``past_key_values`` to ``cache``.
    """

    def __init__(self, config: PLRDLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        ranks = config.plrd_ranks[layer_idx]
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.qkv_proj = linear(config.hidden_size, q_size + 2 * kv_size, ranks["linear_qkv"], config.qkv_bias)
        self.q_proj = Columns(0, q_size)
        self.k_proj = Columns(q_size, q_size + kv_size)
        self.v_proj = Columns(q_size + kv_size, q_size + 2 * kv_size)
        self.o_proj = linear(q_size, config.hidden_size, ranks["linear_proj"])

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(self.qkv_proj(hidden_states), *args, **kwargs)


class PLRDMLP(nn.Module):
    def __init__(self, config: PLRDLlamaConfig, layer_idx: int):
        super().__init__()
        ranks = config.plrd_ranks[layer_idx]
        self.gate_up_proj = linear(config.hidden_size, 2 * config.intermediate_size, ranks["linear_fc1"])
        self.down_proj = linear(config.intermediate_size, config.hidden_size, ranks["linear_fc2"])
        self.act_fn = llama.ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class PLRDLlamaModel(llama.LlamaModel):
    config_class = PLRDLlamaConfig

    def __init__(self, config: PLRDLlamaConfig):
        super().__init__(config)
        for index, layer in enumerate(self.layers):
            layer.self_attn = PLRDAttention(config, index)
            layer.mlp = PLRDMLP(config, index)
        self.post_init()


class PLRDLlamaForCausalLM(llama.LlamaForCausalLM):
    config_class = PLRDLlamaConfig

    def __init__(self, config: PLRDLlamaConfig):
        super().__init__(config)
        self.model = PLRDLlamaModel(config)
        self.post_init()
