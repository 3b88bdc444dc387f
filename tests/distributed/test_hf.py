"""HF -> megatron -> HF for tiny random LLaMA, Mistral and Qwen2: logits equal within 1e-4 (fp32)."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

from nemo_plrd.hf import SafetensorsWeights, arch_from_hf, full_state, merge_factors, to_hf, to_megatron
from nemo_plrd.model import build_gpt, gpt_forward
from nemo_plrd.parallel import init_model_parallel
from megatron.core import parallel_state
from tp_utils import shared_tmp, tp_gather

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
# No field at transformers' default (rms_norm_eps 1e-6, rope_theta 10,000): one lost on the way, filled in with
# the default again, changes the logits. (The embeddings' small init makes the first norm's eps count.)
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-3)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True, rope_theta=50.0),
    "mistral": lambda: transformers.MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=None,
                                                  rope_theta=10.5),  # a fractional base, so a truncated one shows
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, rope_theta=200.0),
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


def test_a_sharded_safetensors_checkpoint_is_read_tensor_by_tensor_into_the_same_shards(tmp_path_factory):
    """What a TP rank imports reads one tensor at a time (not the whole model on every rank), from the
    shards an index names, into the shards the in-memory state dict gives."""
    hf, tied = hf_model("qwen2"), hf_model("llama")  # the llama's checkpoint holds no lm_head
    tmp_path = Path(shared_tmp(tmp_path_factory, "safetensors"))
    if dist.get_rank() == 0:  # transformers saves on rank 0 of a process group
        hf.save_pretrained(tmp_path, max_shard_size="100KB")
        tied.save_pretrained(tmp_path / "tied")
    dist.barrier()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    arch, lazy = arch_from_hf(hf.config), SafetensorsWeights(tmp_path)
    for rank in range(2):
        expected = to_megatron(hf.state_dict(), arch, 2, rank)
        shard = to_megatron(lazy, arch, 2, rank)
        assert shard.keys() == expected.keys() and all(torch.equal(shard[k], expected[k]) for k in expected)
    untied = dataclasses.replace(arch_from_hf(tied.config), tie_embeddings=False)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'tied'} holds no tensor 'lm_head.weight'"):
        to_megatron(SafetensorsWeights(tmp_path / "tied"), untied, 2, 0)
    # a config that says tied over a checkpoint whose output layer is its own tensor, as transformers loads it
    with pytest.raises(ValueError, match=r"the config ties the word embeddings \(tie_word_embeddings=true\), but the "
                                         r"checkpoint's lm_head.weight is another tensor"):
        to_megatron(lazy, dataclasses.replace(arch, tie_embeddings=True), 2, 0)


def test_unsupported_architectures_are_refused():
    config = transformers.GPT2Config()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported:"):
        arch_from_hf(config)
    with pytest.raises(ValueError, match=r"hidden_act='gelu' is not supported; supported: 'silu' \(SwiGLU\)"):
        arch_from_hf(transformers.LlamaConfig(**COMMON, hidden_act="gelu"))
    fp8 = transformers.LlamaConfig(**COMMON, quantization_config={"quant_method": "fp8", "weight_block_size": [8, 8]})
    with pytest.raises(ValueError, match=r"quantization_config \(quant_method 'fp8'\) is not supported"):
        arch_from_hf(fp8)
    for key, what in (("mlp_bias", "biases on the MLP projections"), ("attention_bias", "a bias on o_proj as well")):
        with pytest.raises(ValueError, match=rf"{key}=True \({what}"):  # named as the config.json has it
            arch_from_hf(transformers.LlamaConfig(**COMMON, **{key: True}))
