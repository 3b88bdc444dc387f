"""Export a megatron GPTModel (dense or factored, any TP size) as a Hugging Face model directory.

Two formats:
- ``merged``: every factored slot multiplied out (W = up @ down) into the parent's own stock
  HF class; loads with plain ``AutoModelForCausalLM.from_pretrained``. For tools that only
  know stock models; as large and as slow as the parent.
- ``factored``: the factors themselves, with the modeling code (``hf_modeling/modeling_plrd.py``)
  saved alongside and named in ``auto_map``; loads with ``trust_remote_code=True``. Really
  smaller, and faster on a CPU (on a GPU at batch 1, slower than the parent: BENCHMARKS.md).

Either is written in fp32 (the default: what training's master weights hold), bf16 or fp16, or
in the parent's own dtype (``parent``), as an HF user expects a member of a bf16 parent to be;
a merged slot is multiplied out in fp32 and rounded once.

Every rank calls ``export_hf`` (the weights are gathered over TP); rank 0 writes into
``<out>.partial`` and renames it when complete.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_plrd.errors import InputError
from nemo_plrd.export_options import DTYPES, FORMATS, check_dtype
from nemo_plrd.files import refuse_existing, sync_tree
from nemo_plrd.hf import arch_from_hf, full_state, hf_tokenizer, merge_factors, to_hf, to_hf_factored
from nemo_plrd.parallel import exists_on_rank0
from nemo_plrd.transform import model_ranks

# Parent config keys that describe the parent's class, not the architecture.
_CLASS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")
# a parent's attention window: Mistral's sliding_window; Qwen2's use_sliding_window, max_window_layers and the
# layer_types they make (transformers 5)
_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def _torch_dtype(dtype: str, parent_config, key: str) -> torch.dtype:
    """``dtype`` as torch's; ``parent``: the dtype the parent's config.json names (fp32 if it names none)."""
    check_dtype(key, dtype)
    if dtype == "parent":
        dtype = getattr(parent_config, "dtype", None) or getattr(parent_config, "torch_dtype", None) or "float32"
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise InputError(f"{key}='parent': the parent's config names {dtype}, not one of {list(DTYPES[:3])}; "
                             "give one of them")
    return getattr(torch, dtype)


def check_export_dtype(dtype: str, hf_source: str | Path, key: str) -> None:
    """An export's dtype against the parent's config, refused naming ``key`` (the setting the user gave) before
    the model is trained or loaded, not once it is."""
    from transformers import AutoConfig

    _torch_dtype(dtype, AutoConfig.from_pretrained(hf_source), key)


def _full_attention(parent_config):
    """The parent's config attending to the whole context, as megatron trained the member: a parent's
    sliding window is not kept."""
    config = copy.deepcopy(parent_config)
    config.sliding_window = None
    if getattr(config, "use_sliding_window", False):
        config.use_sliding_window = False
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    return config


def _hf_model(format: str, parent_config, ranks, arch) -> torch.nn.Module:
    """An empty (meta-device) HF model of the export's class, to receive the weights."""
    from transformers import AutoModelForCausalLM

    from nemo_plrd.hf_modeling.modeling_plrd import PLRDLlamaConfig, PLRDLlamaForCausalLM, PLRDLlamaModel

    with torch.device("meta"):
        if format == "merged":  # transformers' own class: a parent's auto_map names code no export carries
            config = _full_attention(parent_config)
            config.__dict__.pop("auto_map", None)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fields = {k: v for k, v in parent_config.to_dict().items() if k not in _CLASS_KEYS + _WINDOW_KEYS}
        config = PLRDLlamaConfig(**fields, plrd_ranks=ranks, qkv_bias=arch.qkv_bias)
        config.architectures = [PLRDLlamaForCausalLM.__name__]
        PLRDLlamaConfig.register_for_auto_class()
        PLRDLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
        # the hidden states, for embedding tools (save_pretrained adds the saved class's own entries)
        config.auto_map = {"AutoModel": f"modeling_plrd.{PLRDLlamaModel.__name__}"}
        return PLRDLlamaForCausalLM(config)


def export_hf(model: torch.nn.Module, out_dir: str | Path, hf_source: str | Path, format: str = "factored",
              dtype: str = "float32") -> Path:
    """Write ``model`` to ``out_dir`` as an HF model in ``dtype`` (one of ``DTYPES``); ``hf_source`` holds the
    parent's config and tokenizer."""
    from transformers import AutoConfig

    if format not in FORMATS:
        raise InputError(f"format={format!r} is not one of {FORMATS}")
    out_dir = Path(out_dir)
    # rank 0's answer: a late rank would see rank 0's finished export
    refuse_existing(out_dir, "HF model directory", exists_on_rank0)
    parent_config = AutoConfig.from_pretrained(hf_source)
    # refused on every rank alike, before the gather: a parent without a tokenizer fails here, not after it
    arch, weights = arch_from_hf(parent_config), _torch_dtype(dtype, parent_config, "dtype")
    tokenizer = hf_tokenizer(hf_source)  # an HF model is exported with its parent's
    writer = not dist.is_initialized() or dist.get_rank() == 0
    full = full_state(model, keep=writer)  # collective: every rank takes part
    if writer:
        _write(full, arch, parent_config, model_ranks(model), format, out_dir, hf_source, weights, tokenizer)
    if dist.is_initialized():
        dist.barrier()  # every rank returns once the directory is complete
    return out_dir


def _write(full, arch, parent_config, ranks, format, out_dir: Path, hf_source, dtype: torch.dtype, tokenizer) -> None:
    from transformers import GenerationConfig

    state = to_hf(merge_factors(full), arch) if format == "merged" else to_hf_factored(full, arch)
    full.clear()  # state holds most of its tensors themselves: the caller's reference would keep every one alive
    for name in list(state):  # one tensor at a time: no second copy of the model (save_pretrained records the dtype)
        state[name] = state[name].to(dtype)
    hf_model = _hf_model(format, parent_config, ranks, arch)
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model.tie_weights()
    rope = getattr(hf_model.config, "rope_parameters", None) or {}
    if "rope_theta" in rope:  # transformers 4 reads it at the top level only, and takes 10,000 without it
        hf_model.config.rope_theta = rope["rope_theta"]
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if (Path(hf_source) / "generation_config.json").is_file():  # the parent's stop tokens and sampling defaults
        hf_model.generation_config = GenerationConfig.from_pretrained(hf_source)
    hf_model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    sync_tree(partial)
    partial.rename(out_dir)
