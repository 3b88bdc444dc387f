"""FLOP accounting against torch's own counter: the family plan table's (bench/stage_throughput.py's
denominator too) and bench/hf_inference.py's, the denominator of its target."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import hf_inference  # noqa: E402

from nemo_plrd.family_plan import forward_flops_per_token  # noqa: E402
from nemo_plrd.hf_modeling.modeling_plrd import PLRDLlamaConfig, PLRDLlamaForCausalLM  # noqa: E402
from nemo_plrd.model import SMOLLM2_135M, build_gpt, gpt_forward  # noqa: E402
from nemo_plrd.parallel import init_model_parallel  # noqa: E402
from nemo_plrd.plan import plan_ranks  # noqa: E402

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


def test_the_family_table_s_flops_per_token_equal_the_counted_ones_of_a_megatron_forward():
    """A factored megatron GPT's forward: every product is counted, the weights' exactly as the formula has
    them; megatron's local attention multiplies the whole S x S square, the formula the causal half."""
    arch = dataclasses.replace(SMOLLM2_135M, num_layers=2, vocab_size=1000)
    init_model_parallel(1)
    plan = plan_ranks([arch.slot_shapes()] * arch.num_layers, keep=0.5)
    model = build_gpt(arch, plan.layer_ranks()).eval()
    tokens = 16
    masked = 2 * arch.num_layers * arch.hidden_size * tokens * (tokens - 1)  # 4 x hidden x the S(S-1)/2 above
    assert counted(lambda: gpt_forward(model, torch.randint(0, arch.vocab_size, (1, tokens)))) == \
        forward_flops_per_token(plan, arch, tokens) * tokens + masked
