"""HF -> megatron -> HF for tiny random LLaMA, Mistral and Qwen2: logits equal within 1e-4 (fp32)."""

import pytest
import torch
import transformers

from nemo_plrd.hf import arch_from_hf, full_state, merge_factors, to_hf, to_megatron
from nemo_plrd.model import build_gpt, gpt_forward
from nemo_plrd.parallel import init_model_parallel
from megatron.core import parallel_state
from tp_utils import tp_gather

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
}


def hf_model(kind: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model


@pytest.mark.parametrize("tp_size", [1, 2], indirect=True)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_hf_megatron_hf_round_trip(kind, tp_size):
    hf = hf_model(kind)
    arch = arch_from_hf(hf.config)
    assert arch.qkv_bias == (kind == "qwen2")
    init_model_parallel(tp_size)
    model = build_gpt(arch)
    model.load_state_dict(to_megatron(hf.state_dict(), arch, tp_size,
                                      parallel_state.get_tensor_model_parallel_rank()), strict=False)
    with torch.no_grad():
        expected = hf(TOKENS).logits
        logits = tp_gather(gpt_forward(model, TOKENS), -1)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        back = hf_model(kind)  # a fresh copy, overwritten with the exported weights
        back.load_state_dict(to_hf(merge_factors(full_state(model)), arch), strict=True)
        torch.testing.assert_close(back(TOKENS).logits, expected, rtol=0, atol=1e-4)


def test_unsupported_architectures_are_refused():
    config = transformers.GPT2Config()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported:"):
        arch_from_hf(config)
    with pytest.raises(ValueError, match=r"hidden_act='gelu' is not supported; supported: 'silu' \(SwiGLU\)"):
        arch_from_hf(transformers.LlamaConfig(**COMMON, hidden_act="gelu"))
