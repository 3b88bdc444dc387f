"""bench/hf_inference.py's FLOP accounting, the denominator of its target, against torch's own counter."""

import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hf_inference  # noqa: E402

from nemo_plrd.hf_modeling.modeling_plrd import PLRDLlamaConfig, PLRDLlamaForCausalLM  # noqa: E402

SIZES = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)
RANKS = {"linear_qkv": 24, "linear_proj": 16, "linear_fc1": 32, "linear_fc2": None}


def tiny(factored: bool, attention: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if factored:
        config = PLRDLlamaConfig(plrd_ranks=[RANKS] * SIZES["num_hidden_layers"], **SIZES)
        model = PLRDLlamaForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES))
    model.config._attn_implementation = attention
    return model.eval()


def counted(run) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factored"])
def test_phase_flops_equal_the_counted_ones(factored):
    """Decode with eager attention: every product is a counted matmul, so the count must equal the
    formula, but for the prompt's masked half (eager multiplies the whole S x S square; the formula
    counts the causal S(S+1)/2 a causal kernel computes). Prefill with SDPA: torch does not count the
    CPU attention kernel, so the counter gives the weight products: the formula less its causal term."""
    model = tiny(factored, "eager")
    formula = hf_inference.phase_flops(model)
    prompt = torch.randint(0, SIZES["vocab_size"], (1, hf_inference.PREFILL))
    per_position = 4 * SIZES["num_hidden_layers"] * SIZES["hidden_size"]  # QK^T and AV, every head
    short = hf_inference.SHORT
    decode = counted(lambda: model.generate(prompt[:, :short], max_new_tokens=hf_inference.DECODE,
                                            min_new_tokens=hf_inference.DECODE, do_sample=False))
    assert decode == formula["decode"] + per_position * (short * short - short * (short + 1) // 2)

    model.config._attn_implementation = "sdpa"
    tokens = hf_inference.PREFILL
    assert counted(lambda: model(prompt)) == formula["prefill"] - per_position * tokens * (tokens + 1) // 2
