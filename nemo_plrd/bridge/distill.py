"""Logit distillation in a Megatron-Bridge stage: the forward step ``pretrain`` runs for ``train.loss`` kd / lm+kd.

Bridge's own ``forward_step`` gives the model labels, so megatron returns the per-token cross
entropy; distillation needs the logits themselves. This step reads the batch with Bridge's
``get_batch``, runs the student and the frozen teacher without labels ([b, s, v / tp] each, the
vocabulary never gathered), takes the per-token loss from ``nemo_plrd.distill`` (the local
stage's) and reduces it with Bridge's ``masked_next_token_loss``, so loss averaging over the
global batch, NaN checks and logging stay Bridge's. The teacher is loaded on the first step, once
Bridge has set megatron's parallel state up, at the job's TP size and the student's dtype; it is
never part of the job's checkpoints, so a resumed stage loads it again. Validation runs Bridge's
own step: the validation loss is the LM loss whatever the training loss, as in a local stage.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from megatron.bridge.training.gpt_step import forward_step, get_batch
from megatron.bridge.training.losses import masked_next_token_loss
from megatron.bridge.training.utils.flop_utils import get_model_chunk_vp_stage
from megatron.bridge.training.utils.pg_utils import get_pg_collection
from megatron.core.utils import get_model_config

from nemo_plrd import distill
from nemo_plrd.bridge.config import PLRDConfigContainer
from nemo_plrd.errors import InputError


def loss_key(loss: str) -> str:
    """The training loss's key in Bridge's loss dict and log: ``lm loss`` (Bridge's own), ``kd loss``
    or ``lm+kd loss``."""
    return f"{loss} loss"


def teacher_source(teacher: str, hf_path: str, parent: Optional[str]) -> Path:
    """``previous``: the stage's parent (``--parent``, or stage 1's ``--hf-path``); ``parent``: the
    family's, which only stage 1 knows (it is its ``--hf-path``); else a model directory."""
    if teacher == "previous" or (teacher == "parent" and parent is None):
        return Path(parent or hf_path)
    if teacher == "parent":
        raise InputError(f"train.teacher='parent' names the family's parent, which a stage started from "
                         f"--parent {parent} does not know: give its directory (train.teacher=/path/to/hf-model) "
                         "or train.teacher=previous")
    return Path(teacher)


class DistillationStep:
    """Bridge's forward step with ``loss`` (kd or lm+kd) to the teacher at ``source``."""

    def __init__(self, loss: str, kd_weight: float, source: Path):
        self.loss, self.kd_weight, self.source = loss, kd_weight, source
        self.teacher: Optional[torch.nn.Module] = None

    def __call__(self, state, data_iterator: Iterable, model: torch.nn.Module,
                 return_schedule_plan: bool = False) -> tuple[torch.Tensor, Callable]:
        if not model.training:  # validation: the LM loss whatever the training loss, as in a local stage
            return forward_step(state, data_iterator, model, return_schedule_plan)
        if return_schedule_plan:
            raise InputError("train.loss=kd does not run with overlap_moe_expert_parallel_comm (no schedule plan)")
        tokens, labels, loss_mask, attention_mask, position_ids, packed = get_batch(
            data_iterator, state.cfg, pg_collection=get_pg_collection(model), vp_stage=get_model_chunk_vp_stage(model))
        if packed is not None:
            raise InputError("train.loss=kd does not take packed sequences: give the stage unpacked data")
        if self.teacher is None:
            self.teacher = distill.load_teacher(self.source, get_model_config(model).params_dtype).to(tokens.device)
        inputs = {"input_ids": tokens, "position_ids": position_ids, "attention_mask": attention_mask}
        logits = model(**inputs)  # [b, s, v/tp]: no labels, no loss inside the model
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs)
        per_token = distill.distillation_loss(self.loss, logits, teacher_logits, labels, self.kd_weight)
        reruns = state.cfg.rerun_state_machine  # as Bridge's own step reads them
        reduce = functools.partial(masked_next_token_loss, loss_mask,
                                   check_for_nan_in_loss=reruns.check_for_nan_in_loss,
                                   check_for_spiky_loss=reruns.check_for_spiky_loss)
        return per_token, functools.partial(_named, reduce, loss_key(self.loss))


def _named(reduce: Callable, name: str, output_tensor: torch.Tensor):
    """Bridge's reduction, its loss reported as ``name`` (Bridge calls every loss ``lm loss``)."""
    loss, tokens, report = reduce(output_tensor)
    return loss, tokens, {name: report[loss_key("lm")]}


def stage_forward_step(cfg: PLRDConfigContainer, hf_path: str, parent: Optional[str]) -> Callable:
    """Bridge's ``forward_step`` for the LM loss, else a ``DistillationStep``; the teacher's architecture
    and tokenizer are checked against the student's now, from their configs, before any work."""
    if cfg.train.loss == "lm":
        return forward_step
    source = teacher_source(cfg.train.teacher, hf_path, parent)
    distill.check_teacher_source(Path(parent or hf_path), source, f"train.teacher={cfg.train.teacher!r}")
    return DistillationStep(cfg.train.loss, cfg.train.kd_weight, source)
