"""A Megatron-Bridge PLRD stage's checkpoint, read into nemo-plrd's model (no Bridge import needed).

Bridge writes ``iter_*`` folders under ``checkpoint.save``; the stage adds its ranks there
(``PLAN_FILE``). The model's tensors are keyed as nemo-plrd's own layers key them, so the
model built at those ranks loads them directly, at any TP size; the rest of Bridge's state
(optimizer, scheduler, iteration) stays behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import yaml
from megatron.core import dist_checkpointing
from transformers import AutoConfig

from nemo_plrd.checkpoint import check_shards
from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.hf import arch_from_hf
from nemo_plrd.model import LlamaArch, build_gpt
from nemo_plrd.plan import RankPlan

PLAN_FILE = "plrd_plan.json"  # in checkpoint.save: the ranks a resumed job rebuilds the model at
TRACKER = "latest_checkpointed_iteration.txt"  # megatron's: the newest iteration saved
TRAIN_STATE = "latest_train_state.pt"  # Bridge's: the newest iteration saved, written before TRACKER
STAGE_FILE = "plrd_stage.json"  # in checkpoint.save: the PLRD settings and parent the stage started with
RUN_CONFIG = "run_config.yaml"  # Bridge's, in each iter_* folder: the job's whole config

T = TypeVar("T")


def iteration_folder(save: Path, iteration: int) -> Path:
    """Where megatron saves ``iteration`` under ``checkpoint.save``."""
    return save / f"iter_{iteration:07d}"


def read_record(path: Path, parse: Callable[[Path], T]) -> T:
    """``parse(path)`` of a record a stage resumes, converts or is checked by: one that cannot be read (a copy cut
    short, an edit, another file under its name) is refused naming it, not met as a traceback from the parser."""
    try:
        return parse(path)
    except Exception as error:  # whatever the parser raises on text it cannot take
        detail = (str(error).splitlines() or [""])[0].split(". ")[0]  # its first sentence: torch.load's goes on
        # to advise loading the file with weights_only=False
        raise InputError(f"{path} is damaged ({type(error).__name__}: {detail}): restore it, or run the stage again "
                         "with a new checkpoint.save") from None


def _json_object(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise TypeError(f"a JSON object was expected, not {type(record).__name__}")
    return record


def read_plan(save: Path) -> RankPlan:
    """The ranks the stage in ``save`` decomposed its parent at."""
    return read_record(save / PLAN_FILE, lambda path: RankPlan.from_json(path.read_text()))


def read_started(save: Path) -> Optional[dict[str, Any]]:
    """The settings and parent the stage in ``save`` started with (None where unrecorded: an older stage)."""
    return read_record(save / STAGE_FILE, _json_object) if (save / STAGE_FILE).is_file() else None


def _train_iters(folder: Path) -> Optional[int]:
    """The ``train.train_iters`` of the job that saved ``folder`` (Bridge's ``run_config.yaml`` beside it)."""
    config = folder / RUN_CONFIG
    if not config.is_file():
        return None
    return read_record(config, lambda path: (yaml.safe_load(path.read_text()).get("train") or {}).get("train_iters"))


def saved_iteration(save: Path) -> Optional[int]:
    """The iteration Bridge resumes ``save`` from (None before its first save), read as Bridge reads it: its own
    ``TRAIN_STATE`` first, megatron's ``TRACKER`` else. A kill between the two writes leaves the tracker one save
    behind: read alone, it would resume the metrics and the conversion at another step than the model's."""
    if (save / TRAIN_STATE).is_file():
        return read_record(save / TRAIN_STATE, lambda path: int(torch.load(path, weights_only=True)["step"]))
    if (save / TRACKER).is_file():
        return read_record(save / TRACKER, lambda path: int(path.read_text()))
    return None


def load_bridge_stage(save: str | Path, hf_path: str | Path,
                      iteration: Optional[int] = None) -> tuple[torch.nn.Module, LlamaArch]:
    """The model of a Bridge stage's checkpoint (its newest, or ``iteration``) at megatron's current TP size."""
    save = Path(save)
    saved = saved_iteration(save)
    if saved is None or not (save / PLAN_FILE).is_file():
        raise MissingInputError(f"{save} has no {TRACKER if saved is None else PLAN_FILE}: it is not the "
                                "checkpoint.save of a PLRD Bridge stage")
    newest = iteration is None
    iteration = saved if newest else iteration
    folder = iteration_folder(save, iteration)
    if not (folder / "metadata.json").is_file():
        raise MissingInputError(f"{folder} is not a saved iteration of {save}")
    planned = _train_iters(folder)
    if newest and planned is not None and iteration < planned:
        raise InputError(f"{save}: its newest checkpoint is iteration {iteration} of train.train_iters={planned}; the "
                         "stage stopped early (train.exit_duration_in_mins, exit_interval or exit_signal_handler end "
                         f"a job with status 0): run it again to finish, or give --iteration {iteration} to take it "
                         "as it is")
    check_shards(folder)
    arch = arch_from_hf(AutoConfig.from_pretrained(hf_path))
    model = build_gpt(arch, read_plan(save).layer_ranks())
    wanted = model.sharded_state_dict()
    loaded = dist_checkpointing.load(wanted, str(folder))
    model.load_state_dict({key: value for key, value in loaded.items() if key in wanted})
    return model, arch
