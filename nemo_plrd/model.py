"""LLaMA-family decoders as megatron-core ``GPTModel`` s, dense or with low-rank slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_plrd.errors import InputError
from nemo_plrd.slots import SlotRanks
from nemo_plrd.spec import low_rank_block_spec


@dataclass(frozen=True)
class LlamaArch:
    """The architecture facts of a LLaMA / Mistral / Qwen2-style decoder (GQA, RMSNorm, SwiGLU, RoPE)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_sequence_length: int = 2048
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise InputError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def slot_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear slot of one layer, fused as megatron fuses them."""
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * self.head_dim
        return {
            "linear_qkv": (qkv_out, self.hidden_size),
            "linear_proj": (self.hidden_size, self.num_attention_heads * self.head_dim),
            "linear_fc1": (2 * self.ffn_hidden_size, self.hidden_size),
            "linear_fc2": (self.hidden_size, self.ffn_hidden_size),
        }


# HuggingFaceTB/SmolLM2-135M: the embedded default parent (docs/design.md, section 5).
SMOLLM2_135M = LlamaArch(
    num_layers=30,
    hidden_size=576,
    ffn_hidden_size=1536,
    num_attention_heads=9,
    num_query_groups=3,
    vocab_size=49152,
    max_sequence_length=8192,
    rotary_base=100000.0,
)


def check_tensor_parallel(arch: LlamaArch, tensor_parallel_size: int, key: str = "tensor_parallel_size") -> None:
    """megatron splits the KV heads, the MLP width and the vocabulary (not padded) over the TP ranks, and its
    own check is a bare assertion: refused naming ``key``, the setting the user gave."""
    sizes = {"the number of KV heads": arch.num_query_groups, "the MLP width": arch.ffn_hidden_size,
             "the vocabulary": arch.vocab_size}
    for what, size in sizes.items():
        if size % tensor_parallel_size:
            raise InputError(f"{key}={tensor_parallel_size} must divide {what} ({size})")


def check_sequence_length(arch: LlamaArch, seq_length: int, key: str) -> None:
    """A sequence longer than the parent's ``max_position_embeddings`` is out of what its RoPE was trained on
    (megatron's own arguments refuse it too); refused before the first batch, naming ``key``."""
    if seq_length > arch.max_sequence_length:
        raise InputError(f"{key}={seq_length} is longer than the parent's max_position_embeddings "
                         f"({arch.max_sequence_length})")


def transformer_config(
    arch: LlamaArch,
    tensor_parallel_size: int = 1,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
) -> TransformerConfig:
    check_tensor_parallel(arch, tensor_parallel_size)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
    )


def build_gpt(
    arch: LlamaArch,
    ranks: Union[SlotRanks, Sequence[SlotRanks], None] = None,
    tensor_parallel_size: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
) -> GPTModel:
    """A GPTModel on megatron's current parallel state; ``ranks`` maps slots to ranks (none: dense)."""
    tp = tensor_parallel_size or parallel_state.get_tensor_model_parallel_world_size()
    config = transformer_config(arch, tp, sequence_parallel, params_dtype)
    block_spec = low_rank_block_spec(config, {} if ranks is None else ranks)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_sequence_length,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rotary_base,  # a float: megatron computes the frequencies in floats
    )
    return model.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the whole model across TP ranks (TP-sharded ones times the TP size)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return sum(
        p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
        for p in model.parameters()
    )


def gpt_forward(model: torch.nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
    """A causal GPTModel forward from token ids [b, s]: logits, or per-token loss given labels."""
    device = next(model.parameters()).device  # token batches come from the CPU data path
    input_ids = input_ids.to(device)
    labels = None if labels is None else labels.to(device)
    position_ids = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=None, labels=labels)
