"""The Megatron-Bridge lane (run by scripts/test.sh in .venv-bridge): Bridge's real code on CPU.

The CPU stand-ins go in before anything imports Bridge; they cover hardware and Python-version
gaps only (tests/bridge/cpu_shims.py).
"""

import cpu_shims

cpu_shims.install()

from pathlib import Path  # noqa: E402  (after the stand-ins, as everything in the lane)

import pytest  # noqa: E402
from tiny_llama import save_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer, so the stage's data is real text."""
    return save_tiny_llama(tmp_path_factory.mktemp("parent"), max_position_embeddings=512)  # >= every calibration here
