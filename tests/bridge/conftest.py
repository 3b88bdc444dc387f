"""The Megatron-Bridge lane (run by scripts/test.sh in .venv-bridge): Bridge's real code on CPU.

The CPU stand-ins go in before anything imports Bridge; they cover hardware and Python-version
gaps only (tests/bridge/cpu_shims.py).
"""

import cpu_shims

cpu_shims.install()

import shutil  # noqa: E402  (after the stand-ins, as everything in the lane)
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from nemo_plrd.assets import smollm2_135m  # noqa: E402


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer, so the stage's data is real text."""
    path = tmp_path_factory.mktemp("parent")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_135m() / name, path / name)
    return path
