"""A factored megatron model (TP=1 and TP=2) exported merged and factored: same logits, real sizes."""

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from megatron.core import parallel_state
from safetensors.torch import load_file
from tokenizers import Tokenizer, models

from nemo_plrd.export import export_hf
from nemo_plrd.hf import arch_from_hf, to_megatron
from nemo_plrd.model import build_gpt, gpt_forward, parameter_count
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.transform import apply_plan, plan_for
from test_hf import COMMON, CONFIGS, TOKENS, hf_model
from tp_utils import shared_tmp, tp_gather


def save_parent(model, path):
    """A tiny random HF parent directory, with a (word-level) tokenizer as exports need one."""
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(256)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")), unk_token="w0")
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("tp_size", [1, 2], indirect=True)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_factored_model_exports_merged_and_factored(kind, tp_size, tmp_path_factory):
    root = shared_tmp(tmp_path_factory, f"{kind}{tp_size}")
    parent = f"{root}/parent"
    if dist.get_rank() == 0:
        save_parent(hf_model(kind), parent)
    dist.barrier()
    arch = arch_from_hf(CONFIGS[kind]())
    init_model_parallel(tp_size)
    model = build_gpt(arch)
    model.load_state_dict(to_megatron(hf_model(kind).state_dict(), arch, tp_size,
                                      parallel_state.get_tensor_model_parallel_rank()), strict=False)
    plan = plan_for(model, [TOKENS], allocation="spectrum", keep=0.6)
    apply_plan(model, plan, [TOKENS], progress=False)
    assert parameter_count(model) == plan.params
    with torch.no_grad():
        expected = tp_gather(gpt_forward(model, TOKENS), -1)

    merged = export_hf(model, f"{root}/merged", parent, format="merged")
    factored = export_hf(model, f"{root}/factored", parent, format="factored")
    stock = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(stock) is type(hf_model(kind))  # a stock class: no remote code
    ours = transformers.AutoModelForCausalLM.from_pretrained(factored, trust_remote_code=True).eval()
    assert type(ours).__name__ == "PLRDLlamaForCausalLM"
    with torch.no_grad():
        for exported in (stock, ours):
            torch.testing.assert_close(exported(TOKENS).logits, expected, rtol=0, atol=1e-4)
    assert ours.num_parameters() == plan.params < stock.num_parameters()
    config = json.loads((factored / "config.json").read_text())
    assert config["plrd_ranks"] == plan.layer_ranks()
    for written in (config, json.loads((merged / "config.json").read_text())):  # where transformers 4 reads it too
        assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == CONFIGS[kind]().rope_parameters["rope_theta"]
    base = transformers.AutoModel.from_pretrained(factored, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(TOKENS).last_hidden_state, ours.model(TOKENS).last_hidden_state,
                                   rtol=0, atol=0)
    assert (factored / "modeling_plrd.py").is_file() and (factored / "tokenizer.json").is_file()


@pytest.mark.parametrize("tp_size", [2], indirect=True)
def test_exports_hold_the_dtype_asked_for_or_the_parent_s_each_weight_rounded_once(tp_size, tmp_path_factory):
    """A member of an fp16 parent exported as ``parent`` is fp16 (a 7B parent's size, not fp32's double),
    bf16 when asked; every tensor equals the fp32 export's rounded to it, and the HF config names it. A parent
    in another dtype is refused, naming it."""
    root = shared_tmp(tmp_path_factory, "dtypes")
    if dist.get_rank() == 0:  # (HF writes a model's weights and config on rank 0 alone)
        save_parent(hf_model("llama").half(), f"{root}/parent")
        save_parent(hf_model("llama").double(), f"{root}/parent64")
    dist.barrier()
    arch = arch_from_hf(CONFIGS["llama"]())
    init_model_parallel(tp_size)
    model = build_gpt(arch)
    model.load_state_dict(to_megatron(hf_model("llama").state_dict(), arch, tp_size,
                                      parallel_state.get_tensor_model_parallel_rank()), strict=False)
    apply_plan(model, plan_for(model, [TOKENS], keep=0.6), [TOKENS], progress=False)
    for format, dtype, written in (("merged", "parent", torch.float16), ("factored", "bfloat16", torch.bfloat16)):
        full = load_file(export_hf(model, f"{root}/{format}-fp32", f"{root}/parent", format=format) / "model.safetensors")
        out = export_hf(model, f"{root}/{format}-{dtype}", f"{root}/parent", format=format, dtype=dtype)
        half = load_file(out / "model.safetensors")
        assert half.keys() == full.keys() and all(torch.equal(half[name], full[name].to(written)) for name in full)
        assert json.loads((out / "config.json").read_text())["dtype"] == str(written).removeprefix("torch.")
        assert transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).dtype == written
    with pytest.raises(ValueError, match=r"dtype='fp8' is not one of \['float32', 'bfloat16', 'float16', 'parent'\]"):
        export_hf(model, f"{root}/fp8", f"{root}/parent", dtype="fp8")
    with pytest.raises(ValueError, match=r"dtype='parent': the parent's config names float64, not one of \['float32'"):
        export_hf(model, f"{root}/out", f"{root}/parent64", dtype="parent")  # refused on every rank, before the gather


def test_export_refuses_bad_requests(tmp_path):
    init_model_parallel(1)
    save_parent(hf_model("llama"), tmp_path / "parent")
    model = build_gpt(arch_from_hf(CONFIGS["llama"]()))
    with pytest.raises(ValueError, match="format='gguf' is not one of"):
        export_hf(model, tmp_path / "out", tmp_path / "parent", format="gguf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(model, tmp_path / "taken", tmp_path / "parent")


def test_a_merged_export_of_a_parent_with_its_own_code_is_transformers_class(tmp_path_factory):
    """A parent's auto_map names its own modeling file, which no export carries: kept in a merged export's
    config, it broke loading with trust_remote_code=True, as plrd eval loads every export."""
    root = Path(shared_tmp(tmp_path_factory, "own-code"))
    parent = root / "parent"
    if dist.get_rank() == 0:
        save_parent(hf_model("llama"), parent)
        (parent / "modeling_custom.py").write_text("from transformers import LlamaForCausalLM\n\n\n"
                                                   "class CustomLlama(LlamaForCausalLM):\n    pass\n")
        config = json.loads((parent / "config.json").read_text())
        (parent / "config.json").write_text(json.dumps(
            {**config, "auto_map": {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}}))
    dist.barrier()
    init_model_parallel(1)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(parent, trust_remote_code=True)).__name__ == \
        "CustomLlama"
    out = export_hf(build_gpt(arch_from_hf(CONFIGS["llama"]())), root / "merged", parent, format="merged")
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)) is \
        transformers.LlamaForCausalLM


def test_a_late_rank_does_not_find_rank0s_export_and_refuse_it(tmp_path_factory):
    """At TP=1 no collective holds rank 0 back before it writes. A rank that looked for the output
    itself, after rank 0 had written it, raised alone and left rank 0 waiting in the final barrier."""
    root = shared_tmp(tmp_path_factory, "late")
    if dist.get_rank() == 0:
        save_parent(hf_model("llama"), f"{root}/parent")
    dist.barrier()
    init_model_parallel(1)
    model = build_gpt(arch_from_hf(CONFIGS["llama"]()))
    out = Path(f"{root}/merged")
    deadline = time.monotonic() + 6
    while dist.get_rank() == 1 and not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # arrive after rank 0 has written, if its broadcast lets it write first
    assert export_hf(model, out, f"{root}/parent", format="merged") == out
    assert (out / "model.safetensors").is_file()


# A parent attending through a window of 4 tokens, and the same parent attending to the whole context.
WINDOWED = {
    "mistral": (lambda: transformers.MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=4),
                {"sliding_window": None}),
    "qwen2": (lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, use_sliding_window=True,
                                               sliding_window=4, max_window_layers=0),
              {"use_sliding_window": False, "layer_types": ["full_attention"] * COMMON["num_hidden_layers"]}),
}


@pytest.mark.parametrize("kind", list(WINDOWED))
def test_exports_compute_the_megatron_member_and_keep_the_parent_s_generation_settings(tmp_path_factory, kind):
    """A parent's sliding window (4 tokens here; the sequences hold 12) is not megatron's full attention:
    both exports compute what the member megatron trained computes. The parent's stop tokens and
    sampling defaults go with every export."""
    root = shared_tmp(tmp_path_factory, f"windowed-{kind}")
    config, full_attention = WINDOWED[kind][0](), WINDOWED[kind][1]
    torch.manual_seed(0)
    parent = transformers.AutoModelForCausalLM.from_config(config).eval()
    if dist.get_rank() == 0:
        parent.generation_config = transformers.GenerationConfig(eos_token_id=[2, 7], do_sample=True, temperature=0.6)
        save_parent(parent, f"{root}/parent")
    dist.barrier()
    init_model_parallel(1)
    arch = arch_from_hf(config)
    model = build_gpt(arch)
    model.load_state_dict(to_megatron(parent.state_dict(), arch, 1, 0), strict=False)
    apply_plan(model, plan_for(model, [TOKENS], keep=0.6), [TOKENS], progress=False)
    with torch.no_grad():
        expected = gpt_forward(model, TOKENS)
    for format in ("merged", "factored"):
        out = export_hf(model, f"{root}/{format}", f"{root}/parent", format=format)
        exported = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(exported(TOKENS).logits, expected, rtol=0, atol=1e-4)
        settings = transformers.GenerationConfig.from_pretrained(out)
        assert (settings.eos_token_id, settings.do_sample, settings.temperature) == ([2, 7], True, 0.6)
    with torch.no_grad():  # the window matters at this length: the parent's own last positions differ
        assert not torch.allclose(parent(TOKENS).logits[:, 4:], transformers.AutoModelForCausalLM.from_pretrained(
            f"{root}/parent", **full_attention).eval()(TOKENS).logits[:, 4:], atol=1e-3)
