"""Hugging Face <-> megatron-core weights for the LLaMA family (LLaMA, Mistral, Qwen2).

Three layouts differ between the two sides:
- megatron fuses q, k, v into ``linear_qkv`` *interleaved per query group*
  ([q heads of group g; k_g; v_g] for g = 0..G-1), so a contiguous TP shard holds whole groups;
- megatron fuses gate and up into ``linear_fc1`` as [gate_i; up_i] *per TP rank* (each
  rank chunks its own output into gate and up);
- megatron shards the vocabulary (embedding, untied output layer) by rows over TP.
``to_megatron`` maps an HF state dict to one TP rank's shard; ``full_state`` gathers a model
(dense or factored) into full tensors, which ``to_hf`` (after ``merge_factors``: a stock HF
model) or ``to_hf_factored`` (the factored model of ``hf_modeling``) map back.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors import SafetensorError, safe_open

from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.model import LlamaArch

SUPPORTED = ("llama", "mistral", "qwen2")
NOT_HF = "is not a Hugging Face model directory"  # what a folder without a config.json is said to be
Tensor = torch.Tensor


def arch_from_hf(config) -> LlamaArch:
    """The architecture facts of an HF config; a clear error for what megatron's GPT cannot hold."""
    if config.model_type not in SUPPORTED:
        raise InputError(f"architecture {config.model_type!r} is not supported; supported: {SUPPORTED}")
    quantization = getattr(config, "quantization_config", None)
    if quantization:  # stored weights beside their scales: read as floats they are not the model's
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", quantization)
        raise InputError(f"quantization_config (quant_method {str(method)!r}) is not supported: the decomposition "
                         "reads the parent's weights in floating point; give the unquantized model")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise InputError(f"head_dim={head_dim} x {config.num_attention_heads} heads != hidden size "
                         f"{config.hidden_size}: not supported")
    if config.hidden_act != "silu":  # megatron's gated MLP here is SwiGLU
        raise InputError(f"hidden_act={config.hidden_act!r} is not supported; supported: 'silu' (SwiGLU)")
    if getattr(config, "mlp_bias", False):
        raise InputError("mlp_bias=True (biases on the MLP projections) is not supported")
    if config.model_type == "llama" and config.attention_bias:  # Qwen2's biases on q, k and v alone are
        raise InputError("attention_bias=True (a bias on o_proj as well as on q, k and v) is not supported")
    # transformers 5 keeps rope_theta in rope_parameters (rope_scaling is an alias); 4.x at the top.
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InputError(f"rope scaling {rope} is not supported")
    return LlamaArch(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        rotary_base=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        norm_eps=float(config.rms_norm_eps),
        tie_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=config.model_type == "qwen2",
    )


def _qkv_to_megatron(q: Tensor, k: Tensor, v: Tensor, arch: LlamaArch) -> Tensor:
    """[q; k; v] (HF, stacked) -> megatron's per-group interleave; works for weights and biases."""
    groups, d = arch.num_query_groups, arch.head_dim
    per_group = lambda t, heads: t.reshape(groups, heads * d, *t.shape[1:])
    heads_per_group = arch.num_attention_heads // groups
    fused = torch.cat([per_group(q, heads_per_group), per_group(k, 1), per_group(v, 1)], dim=1)
    return fused.reshape(-1, *q.shape[1:])


def _qkv_to_hf(fused: Tensor, arch: LlamaArch) -> tuple[Tensor, Tensor, Tensor]:
    groups, d = arch.num_query_groups, arch.head_dim
    heads_per_group = arch.num_attention_heads // groups
    grouped = fused.reshape(groups, (heads_per_group + 2) * d, *fused.shape[1:])
    q, k, v = grouped.split([heads_per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]) for t in (q, k, v))


def to_megatron(hf: Mapping[str, Tensor], arch: LlamaArch, tp: int = 1, tp_rank: int = 0) -> dict[str, Tensor]:
    """One TP rank's shard of a megatron GPTModel state dict from an HF state dict."""
    shard = lambda t, dim: t.chunk(tp, dim)[tp_rank].clone()
    embedding_key = "model.embed_tokens.weight"
    if arch.tie_embeddings and embedding_key not in hf and "lm_head.weight" in hf:
        embedding_key = "lm_head.weight"  # tied, saved as the output layer alone: transformers ties to it
    embedding = hf[embedding_key]
    if arch.tie_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], embedding):
        raise InputError("the config ties the word embeddings (tie_word_embeddings=true), but the checkpoint's "
                         "lm_head.weight is another tensor, which transformers loads as the output layer; set "
                         "tie_word_embeddings to false in its config.json")
    out = {"embedding.word_embeddings.weight": shard(embedding, 0),
           "decoder.final_layernorm.weight": hf["model.norm.weight"].clone()}
    if not arch.tie_embeddings:
        out["output_layer.weight"] = shard(hf["lm_head.weight"], 0)
    for i in range(arch.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = lambda name: hf[f"{src}self_attn.{name}"]
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"].clone()
        out[dst + "self_attention.linear_qkv.weight"] = shard(_qkv_to_megatron(
            attn("q_proj.weight"), attn("k_proj.weight"), attn("v_proj.weight"), arch), 0)
        if arch.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = shard(_qkv_to_megatron(
                attn("q_proj.bias"), attn("k_proj.bias"), attn("v_proj.bias"), arch), 0)
        out[dst + "self_attention.linear_proj.weight"] = shard(attn("o_proj.weight"), 1)
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"].clone()
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([shard(gate, 0), shard(up, 0)])
        out[dst + "mlp.linear_fc2.weight"] = shard(hf[src + "mlp.down_proj.weight"], 1)
    return out


def _hf_shared(full: dict[str, Tensor], arch: LlamaArch) -> dict[str, Tensor]:
    """Embedding, norms and LM head: the same in merged and factored exports."""
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"],
           "model.norm.weight": full["decoder.final_layernorm.weight"],
           "lm_head.weight": full["embedding.word_embeddings.weight" if arch.tie_embeddings else "output_layer.weight"]}
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = full[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = full[src + "pre_mlp_layernorm.weight"]
    return out


def to_hf(full: dict[str, Tensor], arch: LlamaArch) -> dict[str, Tensor]:
    """A stock HF state dict from a full, dense megatron state dict (``merge_factors(full_state(m))``)."""
    out = _hf_shared(full, arch)
    for i in range(arch.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if arch.qkv_bias else ("weight",):
            q, k, v = _qkv_to_hf(full[f"{src}self_attention.linear_qkv.{suffix}"], arch)
            out.update({f"{dst}self_attn.q_proj.{suffix}": q, f"{dst}self_attn.k_proj.{suffix}": k,
                        f"{dst}self_attn.v_proj.{suffix}": v})
        out[dst + "self_attn.o_proj.weight"] = full[src + "self_attention.linear_proj.weight"]
        gate, up = full[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = full[src + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# megatron slot -> module of the factored HF model (nemo_plrd/hf_modeling/modeling_plrd.py)
FACTORED_NAMES = {"self_attention.linear_qkv": "self_attn.qkv_proj", "self_attention.linear_proj": "self_attn.o_proj",
                  "mlp.linear_fc1": "mlp.gate_up_proj", "mlp.linear_fc2": "mlp.down_proj"}


def to_hf_factored(full: dict[str, Tensor], arch: LlamaArch) -> dict[str, Tensor]:
    """The factored HF model's state dict: slots stay fused and factored, qkv rows as [q; k; v].

    Each slot's tensors (``weight`` and ``bias`` when dense; ``up.weight``, ``down.weight``,
    ``up.bias`` when factored) keep their names under the HF module; only the rows of the
    qkv output side move from megatron's per-group interleave to [q; k; v].
    """
    out = _hf_shared(full, arch)
    for i in range(arch.num_layers):
        for slot, hf_name in FACTORED_NAMES.items():
            src = f"decoder.layers.{i}.{slot}."
            for name, tensor in full.items():
                if not name.startswith(src):
                    continue
                suffix = name[len(src):]
                if slot.endswith("linear_qkv") and suffix != "down.weight":  # rows are qkv outputs
                    tensor = torch.cat(_qkv_to_hf(tensor, arch))
                out[f"model.layers.{i}.{hf_name}.{suffix}"] = tensor
    return {k: v.contiguous() for k, v in out.items()}


def merge_factors(full: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every factored slot multiplied out (W = up @ down, bias from up): a dense state dict."""
    out = {}
    for name, tensor in full.items():
        if name.endswith(".down.weight"):
            continue
        if name.endswith(".up.weight"):
            prefix = name[: -len("up.weight")]
            out[prefix + "weight"] = tensor @ full[prefix + "down.weight"]
        elif name.endswith(".up.bias"):
            out[name[: -len("up.bias")] + "bias"] = tensor
        else:
            out[name] = tensor
    return out


def _tensor_names(file: Path) -> list[str]:
    """The tensors a safetensors file holds, by its header: a file cut short (a copy or a save that stopped), or
    not safetensors at all, is refused naming it, not at the first tensor read, deep in a load."""
    try:
        with safe_open(file, framework="pt") as weights:
            return list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise InputError(f"{file} cannot be read as safetensors ({error}): the model's weights are damaged or were "
                         "not all written") from None


class SafetensorsWeights(Mapping[str, Tensor]):
    """An HF checkpoint's tensors by name, each read from its safetensors file when asked for, in fp32.

    ``to_megatron`` asks for one tensor at a time and keeps only its TP rank's shard, so a rank
    holds its shard of the model, not the whole model in fp32 (``from_pretrained`` on every rank of
    a node: 8 x 27 GB of host memory for a 7B model at TP=8, 8 x 276 GB at 70B).
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise InputError(f"{index} is not a safetensors index ({type(error).__name__}: {error})") from None
            for file in set(self.files.values()):
                _tensor_names(file)
        else:
            self.files = dict.fromkeys(_tensor_names(folder / "model.safetensors"), folder / "model.safetensors")
        self.folder = folder

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.files:
            raise MissingInputError(f"{self.folder} holds no tensor {name!r}: not a LLaMA-family checkpoint as "
                                    "transformers saves one")
        with safe_open(self.files[name], framework="pt") as weights:
            return weights.get_tensor(name).float()

    def __contains__(self, name: object) -> bool:
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
WEIGHT_FILES = (*SAFETENSORS_FILES, "pytorch_model.bin", "pytorch_model.bin.index.json")


def _holds_any(folder: str | Path, names: tuple[str, ...]) -> bool:
    return any((Path(folder) / name).is_file() for name in names)


def check_weights(hf_model_dir: str | Path) -> None:
    """An HF model directory holds weights (a config alone, such as a PLRD checkpoint's ``hf/``, is refused
    before any work, not when transformers looks for them)."""
    if not _holds_any(hf_model_dir, WEIGHT_FILES):
        raise MissingInputError(f"{hf_model_dir} has an HF config but no weights (none of {', '.join(WEIGHT_FILES)})")
    if _holds_any(hf_model_dir, SAFETENSORS_FILES):
        SafetensorsWeights(hf_model_dir)  # every file's header read: damaged weights refused before any work


def hf_tokenizer(folder: str | Path, remote_code: bool = False):
    """The HF tokenizer in ``folder`` (a model's, or a PLRD checkpoint's ``hf/``), refused naming the folder where
    transformers cannot load one, or where its vocabulary is larger than its model's (``config.json``'s
    ``vocab_size``): its ids past the model's would index outside the embedding, a traceback from deep inside
    the forward, after the model has loaded. Loaded once per process while the folder's files stay as they are
    (half a second for SmolLM2's, asked for by every check of a parent and a teacher); callers only read it."""
    folder = Path(folder)
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()) \
        if folder.is_dir() else ()
    return _checked_tokenizer(folder, folder.absolute(), remote_code, files)


@functools.lru_cache(maxsize=8)
def _checked_tokenizer(folder: Path, where: Path, remote_code: bool, files: tuple):
    """``hf_tokenizer``'s load and checks; ``where`` (the folder wherever the process runs) and ``files`` (name,
    size, time) key the cache, so an edited folder is read again (a refusal raises, and is never cached)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code)
    except (OSError, ValueError) as error:
        raise MissingInputError(f"{folder} holds no tokenizer transformers can load ("
                                f"{str(error).strip().partition(chr(10))[0]})") from None
    config = folder / "config.json"
    vocab_size = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
        raise InputError(f"{folder}: its tokenizer has {tokenizer.vocab_size:,} tokens, more than the model's "
                         f"vocab_size {vocab_size:,} (config.json): give the model the tokenizer it was trained with")
    return tokenizer


def hf_weights(hf_model_dir: str | Path) -> Mapping[str, Tensor]:
    """An HF checkpoint's fp32 state dict: read lazily from safetensors, else (PyTorch pickles) loaded whole."""
    from transformers import AutoModelForCausalLM

    if _holds_any(hf_model_dir, SAFETENSORS_FILES):
        return SafetensorsWeights(hf_model_dir)
    return AutoModelForCausalLM.from_pretrained(hf_model_dir, dtype=torch.float32).state_dict()


def load_hf_weights(model: torch.nn.Module, hf_model_dir: str | Path) -> None:
    """Fill a dense GPTModel (built for the same architecture) from an HF checkpoint directory."""
    hf = hf_weights(hf_model_dir)
    arch = arch_from_hf(_config(hf_model_dir))
    state = to_megatron(hf, arch, parallel_state.get_tensor_model_parallel_world_size(),
                        parallel_state.get_tensor_model_parallel_rank())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise InputError(f"HF weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def import_hf(hf_model_dir: str | Path, sequence_parallel: bool = False) -> tuple[torch.nn.Module, LlamaArch]:
    """A dense GPTModel at megatron's current TP size holding an HF checkpoint's weights."""
    from nemo_plrd.model import build_gpt

    arch = hf_arch(hf_model_dir)
    model = build_gpt(arch, sequence_parallel=sequence_parallel)
    load_hf_weights(model, hf_model_dir)
    return model, arch


def model_type(hf_model_dir: str | Path, missing: str = NOT_HF, remote_code: bool = False) -> str:
    """The ``model_type`` an HF folder's config.json names, one transformers or a factored export's code knows
    (``remote_code``: or the folder's own code, which its ``auto_map`` names); ``missing``: what to say of a
    folder without a config."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from nemo_plrd.hf_modeling.modeling_plrd import PLRDLlamaConfig

    path = Path(hf_model_dir)
    if not (path / "config.json").is_file():
        raise MissingInputError(f"{path} {missing} (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text())
        kind, own_code = config.get("model_type"), "AutoConfig" in (config.get("auto_map") or {})
    except (ValueError, AttributeError, TypeError) as error:  # not JSON (UnicodeDecodeError is a ValueError), or
        # not a mapping, or an auto_map that is not one
        raise InputError(f"{path / 'config.json'} is not an HF model's config (a JSON mapping): {error}") from None
    if not isinstance(kind, str):
        raise InputError(f"{path / 'config.json'} names no model_type: not an HF model's config")
    if kind not in CONFIG_MAPPING and kind != PLRDLlamaConfig.model_type and not (remote_code and own_code):
        raise InputError(f"{path / 'config.json'} names model_type {kind!r}, which this transformers does not know")
    return kind


def _config(hf_model_dir: str | Path, missing: str = NOT_HF):
    """The HF config of ``hf_model_dir``; ``missing``: what to say of a folder without one."""
    from transformers import AutoConfig

    from nemo_plrd.hf_modeling.modeling_plrd import PLRDLlamaConfig

    kind = model_type(hf_model_dir, missing)
    if kind == PLRDLlamaConfig.model_type:  # before transformers asks whether to run its code
        raise InputError(f"{hf_model_dir} is a factored export (model_type {kind!r}), for inference: start from "
                         "the stage's checkpoint/ (or its hf-merged/ export) instead")
    return AutoConfig.from_pretrained(hf_model_dir)


def hf_arch(hf_model_dir: str | Path, missing: str = NOT_HF) -> LlamaArch:
    return arch_from_hf(_config(hf_model_dir, missing))


def _tp_gather(tensor: Tensor, dim: int) -> Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim)


def full_state(model: torch.nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """Every parameter as one full fp32 tensor in host memory (TP-gathered; fc1 rows as [gate; up]),
    factors kept. A collective: every rank takes part; one with ``keep=False`` (an export's ranks
    other than the writer) drops each tensor once gathered, so that only one copy of the whole
    model is ever held, in host memory, never on a GPU.

    Each rank's fc1 rows (dense weight, or the up factor) are [gate_i; up_i]; gathering the
    gate and up halves separately gives the full [gate; up].
    """
    full = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = param.detach()
            if getattr(param, "tensor_model_parallel", False) and parallel_state.get_tensor_model_parallel_world_size() > 1:
                dim = param.partition_dim
                if "linear_fc1." in name and dim == 0:
                    gate, up = tensor.chunk(2)
                    tensor = torch.cat([_tp_gather(gate, 0), _tp_gather(up, 0)])
                else:
                    tensor = _tp_gather(tensor, dim)
            if keep:
                full[name] = tensor.to("cpu", torch.float32)
    return full
