"""A tiny random LLaMA saved with SmolLM2's tokenizer: real text for calibration, training and evaluation."""

import shutil
from pathlib import Path

import torch
import transformers

from nemo_plrd.assets import smollm2_135m


def save_tiny_llama(path: Path, **config) -> Path:
    """Seeded, so every test's parent has the same weights; ``config`` overrides LlamaConfig's fields."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 160,
                                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                         "tie_word_embeddings": True} | config)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return copy_tokenizer(path)


def copy_tokenizer(path: Path) -> Path:
    """SmolLM2's tokenizer files into ``path``."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_135m() / name, path / name)
    return path
