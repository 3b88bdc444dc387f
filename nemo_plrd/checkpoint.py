"""megatron ``dist_checkpointing`` checkpoints of PLRD models, resharding across TP sizes.

A checkpoint written at one TP size loads at any other: each parameter is saved with its
global shape and this rank's fragment (``sharded_state_dict``), replicated factors once.
Beside the shards, ``plrd.json`` records what rebuilds the model (architecture and the rank
of every slot) and ``hf/`` keeps the HF parent's config and tokenizer for export.
Writes go to ``<dir>.partial`` and are renamed into place only after every rank finished,
so an interrupted save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import FileSystemReader

from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.files import refuse_existing, sync_tree
from nemo_plrd.model import LlamaArch, build_gpt
from nemo_plrd.parallel import exists_on_rank0
from nemo_plrd.transform import model_ranks

METADATA = "plrd.json"
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "tokenizer.model",
            "vocab.json", "merges.txt")  # the last three: a BPE tokenizer without tokenizer.json


def save_checkpoint(model: torch.nn.Module, path: str | Path, arch: Optional[LlamaArch] = None,
                    hf_source: str | Path | None = None, state: Optional[dict] = None) -> Path:
    """Save ``model``; with ``arch`` (and the HF parent ``hf_source``) the checkpoint is self-describing.

    ``state`` replaces the model's sharded state dict by a larger one holding it (a training
    state: ``nemo_plrd.train.Trainer.state``); the checkpoint still loads as a model.
    """
    path = Path(path)
    refuse_existing(path, "checkpoint directory", exists_on_rank0)
    partial = path.with_name(path.name + ".partial")
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    dist.barrier()
    # first: megatron warns on a non-empty folder
    dist_checkpointing.save(model.sharded_state_dict() if state is None else state, str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if arch is not None:
            (partial / METADATA).write_text(json.dumps({"arch": asdict(arch), "ranks": model_ranks(model)}, indent=1))
        if hf_source is not None:
            (partial / "hf").mkdir()
            for name in HF_FILES:
                if (Path(hf_source) / name).is_file():
                    shutil.copy(Path(hf_source) / name, partial / "hf" / name)
        sync_tree(partial)
        partial.rename(path)
    dist.barrier()
    return path


def _check_checkpoint(path: Path) -> None:
    if not (path / "metadata.json").is_file():
        raise MissingInputError(f"{path} is not a megatron dist_checkpointing checkpoint (no metadata.json)")
    check_shards(path)


def check_shards(path: Path) -> None:
    """Every shard file of the checkpoint at ``path`` holds the bytes its index (torch's ``.metadata``, which
    megatron's torch_dist format writes) places in it, and megatron's common state is there. A copy or transfer cut
    short is refused naming the file before any rank reads (torch's reader fails midway through the load, naming no
    file)."""
    index = path / ".metadata"
    if not index.is_file():  # another of megatron's formats: nothing to check by
        return
    advice = "the checkpoint was not copied or saved whole; copy it again, or use another"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
        ends: dict[str, int] = {}
        for item in metadata.storage_data.values():
            ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    except Exception as error:  # whatever unpickling a damaged index raises
        raise InputError(f"{index} is damaged ({type(error).__name__}): {advice}") from None
    for name, end in sorted(ends.items()):
        shard = path / name
        if not shard.is_file():
            raise InputError(f"{shard} is missing ({index.name} places {end:,} bytes in it): {advice}")
        if shard.stat().st_size < end:
            raise InputError(f"{shard} is cut short ({shard.stat().st_size:,} of the {end:,} bytes {index.name} places "
                             f"in it): {advice}")
    # megatron's common state: an object in the shards from megatron-core 0.19, common.pt beside them before (a
    # torch.save zip, whose directory, at the end of the file, a cut copy loses)
    common = path / "common.pt"
    if common.is_file():
        try:
            zipfile.ZipFile(common).close()
        except (zipfile.BadZipFile, OSError) as error:
            raise InputError(f"{common} is damaged ({type(error).__name__}: {error}): {advice}") from None
    elif (path / "metadata.json").is_file() and not any(key.startswith("common_state")
                                                        for key in metadata.state_dict_metadata):
        raise InputError(f"{common} is missing (megatron's state beside the shards): {advice}")


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load ``model``'s weights; a training checkpoint's other state (optimizer, scheduler, RNG), which
    megatron's load returns with them, is left out."""
    path = Path(path)
    _check_checkpoint(path)
    wanted = model.sharded_state_dict()
    state = dist_checkpointing.load(wanted, str(path))
    model.load_state_dict({key: state[key] for key in wanted})


def read_metadata(path: str | Path) -> tuple[LlamaArch, list[dict]]:
    """A self-describing checkpoint's architecture and the rank of every slot (per layer)."""
    path = Path(path)
    _check_checkpoint(path)
    if not (path / METADATA).is_file():
        raise MissingInputError(f"{path} has no {METADATA}: it was not saved by nemo_plrd with its architecture")
    try:
        metadata = json.loads((path / METADATA).read_text())
        arch, ranks = LlamaArch(**metadata["arch"]), metadata["ranks"]
        if not (isinstance(ranks, list) and len(ranks) == arch.num_layers and all(isinstance(r, dict) for r in ranks)):
            raise ValueError(f"'ranks' must hold one mapping per layer, {arch.num_layers}")
    except (ValueError, KeyError, TypeError) as error:  # not JSON, a key missing, a field unknown or of another type
        raise InputError(f"{path / METADATA} is damaged ({type(error).__name__}: {error}): not a checkpoint "
                         "nemo_plrd can rebuild; use another, or run the stage that wrote it again") from None
    return arch, ranks


def build_model(path: str | Path, sequence_parallel: bool = False) -> tuple[torch.nn.Module, LlamaArch]:
    """A self-describing checkpoint's model, built at megatron's current TP size, not yet loaded."""
    arch, ranks = read_metadata(path)
    model = build_gpt(arch, None if all(r is None for layer in ranks for r in layer.values()) else ranks,
                      sequence_parallel=sequence_parallel)
    return model, arch


def load_model(path: str | Path, sequence_parallel: bool = False) -> tuple[torch.nn.Module, LlamaArch]:
    """Rebuild a self-describing checkpoint's model at megatron's current TP size and load it."""
    model, arch = build_model(path, sequence_parallel)
    load_checkpoint(model, path)
    return model, arch


def describe_parent(source: str | Path) -> tuple[LlamaArch, Optional[list[dict]], Path]:
    """(arch, ranks per layer or None for a dense HF model, folder of the HF config + tokenizer) of what
    ``load_parent`` would load, without its weights (their files and the tokenizer checked)."""
    from nemo_plrd.hf import check_weights, hf_arch, hf_tokenizer

    path = Path(source)
    if (path / "metadata.json").is_file():
        arch, ranks = read_metadata(path)
        hf = hf_folder(path)
        hf_tokenizer(hf)
        return arch, ranks, hf
    if (path / "checkpoint" / "metadata.json").is_file():  # a stage's folder (its config.json is the stage's)
        raise InputError(f"{path} is a stage's output, not a model: its member is {path / 'checkpoint'} (the PLRD "
                         "checkpoint a later stage starts from)")
    arch = hf_arch(path, missing="is neither a PLRD checkpoint nor an HF model directory")
    check_weights(path)
    hf_tokenizer(path)
    return arch, None, path


def load_parent(source: str | Path) -> tuple[torch.nn.Module, LlamaArch, Path]:
    """(model, arch, folder of the HF config + tokenizer) from a PLRD checkpoint or an HF model directory.

    A checkpoint is a later stage's parent (its factored slots get re-truncated); an HF
    directory is imported dense. Either way the model is built at megatron's current TP size.
    """
    from nemo_plrd.hf import import_hf

    path = Path(source)
    if not (path / "metadata.json").is_file():
        model, arch = import_hf(path)
        return model, arch, path
    hf = hf_folder(path)
    model, arch = load_model(path)
    return model, arch, hf


def hf_folder(checkpoint: str | Path) -> Path:
    """A PLRD checkpoint's ``hf/``: the HF parent's config and tokenizer, which loading it as a parent and
    exporting it read (checked before its weights load)."""
    hf = Path(checkpoint) / "hf"
    if not (hf / "config.json").is_file():
        raise MissingInputError(f"{checkpoint} has no hf/config.json (the HF parent's config and tokenizer): "
                                "save it with save_checkpoint(..., hf_source=...)")
    return hf
