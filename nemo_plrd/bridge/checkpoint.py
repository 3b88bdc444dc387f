"""A Megatron-Bridge PLRD stage's checkpoint, read into nemo-plrd's model (no Bridge import needed).

Bridge writes ``iter_*`` folders under ``checkpoint.save``; the stage adds its ranks there
(``PLAN_FILE``). The model's tensors are keyed as nemo-plrd's own layers key them, so the
model built at those ranks loads them directly, at any TP size; the rest of Bridge's state
(optimizer, scheduler, iteration) stays behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml
from megatron.core import dist_checkpointing
from transformers import AutoConfig

from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.hf import arch_from_hf
from nemo_plrd.model import LlamaArch, build_gpt
from nemo_plrd.plan import RankPlan

PLAN_FILE = "plrd_plan.json"  # in checkpoint.save: the ranks a resumed job rebuilds the model at
TRACKER = "latest_checkpointed_iteration.txt"  # megatron's: the newest iteration saved
TRAIN_STATE = "latest_train_state.pt"  # Bridge's: the newest iteration saved, written before TRACKER
STAGE_FILE = "plrd_stage.json"  # in checkpoint.save: the PLRD settings and parent the stage started with
RUN_CONFIG = "run_config.yaml"  # Bridge's, in each iter_* folder: the job's whole config


def _train_iters(folder: Path) -> Optional[int]:
    """The ``train.train_iters`` of the job that saved ``folder`` (Bridge's ``run_config.yaml`` beside it)."""
    config = folder / RUN_CONFIG
    if not config.is_file():
        return None
    return (yaml.safe_load(config.read_text()).get("train") or {}).get("train_iters")


def saved_iteration(save: Path) -> Optional[int]:
    """The iteration Bridge resumes ``save`` from (None before its first save), read as Bridge reads it: its own
    ``TRAIN_STATE`` first, megatron's ``TRACKER`` else. A kill between the two writes leaves the tracker one save
    behind: read alone, it would resume the metrics and the conversion at another step than the model's."""
    if (save / TRAIN_STATE).is_file():
        return int(torch.load(save / TRAIN_STATE, weights_only=True)["step"])
    if (save / TRACKER).is_file():
        return int((save / TRACKER).read_text())
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
    folder = save / f"iter_{iteration:07d}"
    if not (folder / "metadata.json").is_file():
        raise MissingInputError(f"{folder} is not a saved iteration of {save}")
    planned = _train_iters(folder)
    if newest and planned is not None and iteration < planned:
        raise InputError(f"{save}: its newest checkpoint is iteration {iteration} of train.train_iters={planned}; the "
                         "stage stopped early (train.exit_duration_in_mins, exit_interval or exit_signal_handler end "
                         f"a job with status 0): run it again to finish, or give --iteration {iteration} to take it "
                         "as it is")
    arch = arch_from_hf(AutoConfig.from_pretrained(hf_path))
    model = build_gpt(arch, RankPlan.from_json((save / PLAN_FILE).read_text()).layer_ranks())
    wanted = model.sharded_state_dict()
    loaded = dist_checkpointing.load(wanted, str(folder))
    model.load_state_dict({key: value for key, value in loaded.items() if key in wanted})
    return model, arch
