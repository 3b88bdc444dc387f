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
from megatron.core import dist_checkpointing
from transformers import AutoConfig

from nemo_plrd.errors import MissingInputError
from nemo_plrd.hf import arch_from_hf
from nemo_plrd.model import LlamaArch, build_gpt
from nemo_plrd.plan import RankPlan

PLAN_FILE = "plrd_plan.json"  # in checkpoint.save: the ranks a resumed job rebuilds the model at
TRACKER = "latest_checkpointed_iteration.txt"  # megatron's: the newest iteration saved
STAGE_FILE = "plrd_stage.json"  # in checkpoint.save: the PLRD settings and parent the stage started with


def load_bridge_stage(save: str | Path, hf_path: str | Path,
                      iteration: Optional[int] = None) -> tuple[torch.nn.Module, LlamaArch]:
    """The model of a Bridge stage's checkpoint (its newest, or ``iteration``) at megatron's current TP size."""
    save = Path(save)
    for name in (PLAN_FILE, TRACKER):
        if not (save / name).is_file():
            raise MissingInputError(f"{save} has no {name}: it is not the checkpoint.save of a PLRD Bridge stage")
    iteration = int((save / TRACKER).read_text()) if iteration is None else iteration
    folder = save / f"iter_{iteration:07d}"
    if not (folder / "metadata.json").is_file():
        raise MissingInputError(f"{folder} is not a saved iteration of {save}")
    arch = arch_from_hf(AutoConfig.from_pretrained(hf_path))
    model = build_gpt(arch, RankPlan.from_json((save / PLAN_FILE).read_text()).layer_ranks())
    wanted = model.sharded_state_dict()
    loaded = dist_checkpointing.load(wanted, str(folder))
    model.load_state_dict({key: value for key, value in loaded.items() if key in wanted})
    return model, arch
