"""Token blocks from a text file: the embedded default's calibration, training and held-out data.

On a cluster the data comes from Megatron-Bridge's dataset providers; on one CPU machine
the Shakespeare asset is small enough to tokenise whole. Blocks are contiguous, so
``seq_length + 1`` tokens give a language-modelling input and its shifted labels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_plrd.errors import InputError


def token_blocks(path: str | Path, tokenizer, block_length: int, num_blocks: int, start_block: int = 0) -> torch.Tensor:
    """[num_blocks, block_length] token ids: blocks start_block .. start_block + num_blocks - 1 of the file."""
    ids = tokenizer(Path(path).read_text(), return_tensors="pt").input_ids[0]
    available = ids.numel() // block_length
    if start_block + num_blocks > available:
        raise InputError(f"{path} holds {available} blocks of {block_length} tokens; asked for blocks "
                         f"{start_block}..{start_block + num_blocks - 1}")
    return ids[start_block * block_length:(start_block + num_blocks) * block_length].view(num_blocks, block_length)
