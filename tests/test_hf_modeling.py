"""The factored HF modeling code (``nemo_plrd/hf_modeling``) against transformers' own LLaMA."""

import pytest
import torch
import transformers

from nemo_plrd.hf_modeling.modeling_plrd import PLRDLlamaConfig, PLRDLlamaForCausalLM

SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
DENSE = {"linear_qkv": None, "linear_proj": None, "linear_fc1": None, "linear_fc2": None}
PROMPT, NEW = 7, 12


def fused(stock: dict) -> dict:
    """A stock LLaMA state dict in the factored code's layout: [q; k; v] and [gate; up] rows."""
    out = {}
    for name, value in stock.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            qkv = [stock[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(qkv)
        elif ".gate_proj." in name:
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([value, stock[name.replace("gate", "up")]])
        else:
            out[name] = value
    return out


def greedy(model, prompt):
    return model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_dense_slots_generate_as_transformers_llama(attention):
    """All slots dense: the same weights give transformers' LlamaForCausalLM's logits, prompt and
    cached decode alike (a forward that dropped the KV cache would differ from the second token on)."""
    torch.manual_seed(0)
    stock = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, attn_implementation=attention)).eval()
    ours = PLRDLlamaForCausalLM(PLRDLlamaConfig(plrd_ranks=[DENSE] * 2, **SIZES, attn_implementation=attention))
    ours.load_state_dict(fused(stock.state_dict()))
    ours.eval()
    prompt = torch.randint(0, SIZES["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = greedy(stock, prompt), greedy(ours, prompt)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)
    assert torch.equal(got.sequences, expected.sequences)


def test_low_rank_cached_decode_equals_a_full_forward():
    """Factored slots: each decode step's logits (KV cache) equal one forward over the whole sequence."""
    torch.manual_seed(0)
    ranks = {"linear_qkv": 24, "linear_proj": 16, "linear_fc1": 32, "linear_fc2": 20}
    model = PLRDLlamaForCausalLM(PLRDLlamaConfig(plrd_ranks=[ranks] * 2, **SIZES)).eval()
    prompt = torch.randint(0, SIZES["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = greedy(model, prompt)
        full = model(out.sequences).logits[:, PROMPT - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=0, atol=1e-5)
