"""A PLRD stage inside a Megatron-Bridge pretraining job: the model it builds and the hook that decomposes it.

The provider builds ``nemo_plrd.spec``'s layer spec (megatron's local linears and separate
norms, the slots the transform understands; Bridge's default Transformer Engine spec fuses the
norms into ``linear_qkv`` / ``linear_fc1``). A fresh stage registers three pre-wrap hooks, run
after the model is built and before DDP wraps it: ``StageStart``, where the ranks agree on how the
stage starts, Bridge's HF weight loading (``AutoBridge``) or the parent's checkpoint, then
``PLRDHook``, which calibrates on the job's own data, plans, decomposes and records the
ranks beside the job's checkpoints. A stage whose job was interrupted is rebuilt factored at
the recorded ranks and Bridge resumes it from its last checkpoint; nothing is decomposed again.
A family's stage reads its share of the family's data stream (``StageStream``), as a local stage does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from megatron.bridge.models import AutoBridge
from megatron.bridge.training.callbacks import Callback, CallbackContext

from nemo_plrd.bridge import check_stage_parallelism
from nemo_plrd.bridge.checkpoint import (PLAN_FILE, STAGE_FILE, iteration_folder, read_plan, read_started,
                                        saved_iteration)
from nemo_plrd.bridge.config import DISTILLATION, PLRDConfigContainer, PLRDTrainingConfig
from nemo_plrd.bridge.distill import loss_key
from nemo_plrd.checkpoint import check_shards, describe_parent, load_checkpoint
from nemo_plrd.config import PLRDConfig, check_blend, config_differences, field_defaults, stream_length
from nemo_plrd.data import (blend_lists, cache_builder, calibration_batches, check_prefix, gpt_datasets, index_cache,
                            megatron_tokenizer)
from nemo_plrd.errors import InputError
from nemo_plrd.files import append_line, write_text_atomic
from nemo_plrd.model import check_sequence_length, check_tensor_parallel
from nemo_plrd.spec import low_rank_block_spec
from nemo_plrd.train import keep_saved_steps
from nemo_plrd.transform import PLRDTransform, plan_for

METRICS = "metrics.jsonl"


@dataclass
class PLRDHook:
    """Calibrate on the job's train split, plan, decompose; the plan goes to ``save / PLAN_FILE``, the
    settings it was made with (``started``) to ``save / STAGE_FILE``."""

    plrd: PLRDConfig
    dataset: object  # the job's GPTDatasetConfig: its blend, split and seed
    hf_path: str  # the parent's tokenizer
    save: Path
    started: dict

    def __call__(self, model: list[torch.nn.Module]) -> list[torch.nn.Module]:
        on_one_device(model)
        calib = self.plrd.calibration
        samples = calib.tokens // calib.seq_length
        train, _, _ = gpt_datasets(blend_lists(self.dataset.blend), self.dataset.split, calib.seq_length,
                                   [samples, None, None], megatron_tokenizer(self.hf_path), self.dataset.random_seed)
        batches = calibration_batches(train, samples, calib.micro_batch)
        plan = plan_for(model[0], batches, self.plrd.method, ridge=self.plrd.ridge, **self.plrd.plan.request())
        model = PLRDTransform(plan, lambda: batches, self.plrd.method, self.plrd.solver, self.plrd.ridge)(model)
        if torch.distributed.get_rank() == 0:
            self.save.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.save / STAGE_FILE, json.dumps(self.started, indent=1) + "\n")
            plan.save(self.save / PLAN_FILE)
        return model


def on_one_device(model: list[torch.nn.Module]) -> None:
    """Each chunk moved to the accelerator its linears and embedding are on. megatron allocates those on the GPU
    as it builds them, but a torch norm stays on the CPU until Bridge moves every chunk, after the pre-wrap hooks;
    calibration runs the layers before that. (On a CPU-only build, and with use_cpu_initialization, nothing moves.)"""
    for chunk in model:
        device = next((p.device for p in chunk.parameters() if p.device.type not in ("cpu", "meta")), None)
        if device is not None:
            chunk.to(device)


@dataclass
class StageStart:
    """The stage's first pre-wrap hook: each rank chose how the stage starts (afresh, or resumed from ``saved``)
    and named the data's index folder (``indices``, by the data files' sizes and times) from its own reading of
    the file system, before Bridge started torch.distributed; a rank whose network file system had not yet caught
    up would build another model than the others and leave them waiting in the next collective, or index other
    data. Here, the first time they can, the ranks compare and stop together, naming each difference, before
    anything is loaded or written; then rank 0 drops the metrics of steps the checkpoint does not hold."""

    save: Path
    saved: Optional[int]  # the newest saved iteration this rank found (None: it starts afresh)
    indices: Optional[str] = None  # dataset.path_to_cache as this rank named it

    def __call__(self, model: list[torch.nn.Module]) -> list[torch.nn.Module]:
        found = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, (self.saved, self.indices))
        saved, indices = ([rank[i] for rank in found] for i in (0, 1))
        differences = [f"the ranks read checkpoint.save={str(self.save)!r} differently (its newest saved iteration, "
                       f"by rank; None: none): {saved}"] if len(set(saved)) > 1 else []
        if len(set(indices)) > 1:
            differences.append("the ranks see dataset.blend's files differently (the index folder their sizes and "
                               f"times name, by rank): {indices}")
        if differences:
            raise RuntimeError(f"{'; '.join(differences)}. A network file system that has not caught up with the "
                               "last save or with data prepared again; run the job again")
        if torch.distributed.get_rank() == 0:
            keep_saved_steps(self.save / METRICS, self.saved or 0)  # afresh: none kept
        return model


class StageMetrics(Callback):
    """Rank 0 appends each step's loss (Bridge's ``key`` in its loss dict), learning rate and gradient
    norm to ``save / metrics.jsonl``, the file a local stage writes (``nemo_plrd.train.run``)."""

    def __init__(self, save: Path, key: str = "lm loss"):
        self.path, self.key = save / METRICS, key

    def on_train_step_start(self, context: CallbackContext) -> None:
        self.lr = context.optimizer.param_groups[0]["lr"]  # the step's: the scheduler moves on before it ends

    def on_train_step_end(self, context: CallbackContext) -> None:
        if torch.distributed.get_rank() != 0 or not context.loss_dict:
            return
        row = {"step": context.state.train_state.step + 1,  # the step counter moves after the callbacks
               "loss": float(context.loss_dict[self.key]), "lr": self.lr, "grad_norm": context.grad_norm}
        append_line(self.path, json.dumps(row))


class StageStream(Callback):
    """A family's stage k reads the stream of ``train.stream_samples`` samples from ``train.first_sample``
    on, where stage k-1 stopped, as a local family's stages do.

    Bridge builds its datasets for ``train.train_samples`` when set (validation has already derived
    ``train_iters``; nothing else reads it), so while they are built it is the stream's length and
    every stage has megatron order the same stream; it is back as the job set it before training
    starts (and the config is saved with the checkpoints). A fresh stage's sampler starts at
    ``first_sample`` as a resumed job's starts at its checkpoint's count. The learning-rate schedule
    keeps its own step count, so it starts at 0 either way.
    """

    def on_data_init_start(self, context: CallbackContext) -> None:
        train = context.state.cfg.train
        self.train_samples = train.train_samples
        train.train_samples = stream_length(train.first_sample, train.stream_samples,
                                            train.train_iters * train.global_batch_size)
        if context.state.train_state.step == 0:  # resumed: the checkpoint's count, this stage's first sample on
            context.state.train_state.consumed_train_samples = train.first_sample

    def on_train_start(self, context: CallbackContext) -> None:
        context.state.cfg.train.train_samples = self.train_samples


class IndexBuild(Callback):
    """Rank 0 holds megatron's index cache (``dataset.path_to_cache``) while Bridge builds the datasets, as a local
    stage does (``nemo_plrd.data.cache_builder``): jobs sharing the cache build one at a time, and the index files
    a killed build left torn are dropped first, instead of failing every later job that loads them."""

    def on_data_init_start(self, context: CallbackContext) -> None:
        cfg = context.state.cfg
        self.held = ExitStack()
        self.held.enter_context(cache_builder(cfg.dataset.path_to_cache))

    def on_train_start(self, context: CallbackContext) -> None:
        self.held.close()


def stage_callbacks(cfg: PLRDConfigContainer) -> list[Callback]:
    """The callbacks ``recipes/run_plrd.py`` gives Bridge's ``pretrain`` for the stage ``cfg`` (with
    ``train.num_epochs`` Bridge builds the datasets before any callback could hold the cache, and refuses one)."""
    callbacks = [StageMetrics(Path(cfg.checkpoint.save), loss_key(cfg.train.loss))]
    if getattr(cfg.train, "num_epochs", None) is None:
        callbacks.append(IndexBuild())
    return callbacks + [StageStream()] if cfg.train.in_stream else callbacks


def prepare_stage(cfg: PLRDConfigContainer, hf_path: str, parent: Optional[str] = None) -> PLRDConfigContainer:
    """Make ``cfg`` (its provider built from the HF config at ``hf_path``) a PLRD stage, in place.

    Stage 1 starts from the HF model at ``hf_path``; a later stage from ``parent``, the previous
    stage's nemo-plrd checkpoint (``conversion/bridge_to_plrd.py`` makes one of a Bridge stage's),
    built factored at its ranks and re-truncated to the new plan.
    """
    if cfg.checkpoint.save is None:
        raise InputError("checkpoint.save must be set: a PLRD stage records its ranks beside its checkpoints")
    check_stage_parallelism(cfg.model.pipeline_model_parallel_size, cfg.model.context_parallel_size)
    tp = cfg.model.tensor_model_parallel_size
    if cfg.model.sequence_parallel and tp > 1 and cfg.plrd.calibration.seq_length % tp:
        raise InputError(f"plrd.calibration.seq_length={cfg.plrd.calibration.seq_length} must be a multiple of "
                         f"model.tensor_model_parallel_size={tp} under model.sequence_parallel: calibration's "
                         "sequences are split over the TP ranks")
    if cfg.dataset.blend is None and getattr(cfg.dataset, "data_path", None) is not None:  # Bridge >= 0.6
        cfg.dataset.blend = _blend(cfg.dataset.data_path)  # what Bridge makes of it when it validates the job
    if cfg.dataset.blend is None:
        raise InputError("dataset.blend (or dataset.data_path) must name the stage's data: PLRD calibrates on its "
                         "train split")
    for prefix in check_blend("dataset.blend", cfg.dataset.blend):
        check_prefix("dataset.blend", prefix)
    if cfg.dataset.path_to_cache is None:  # megatron's default, beside the data, keys the indices by path alone
        # a folder of its own: Bridge builds there without the lock under which calibration's build drops torn files
        cfg.dataset.path_to_cache = str(index_cache(cfg.dataset.blend[0]) / "bridge")
    if cfg.inprocess_restart is not None and cfg.inprocess_restart.enabled:
        raise InputError("inprocess_restart.enabled=true: a PLRD stage decides once, before training, whether it "
                         "starts afresh or resumes; let the scheduler requeue the job instead, which resumes it")
    if cfg.checkpoint.ckpt_step is not None or cfg.checkpoint.non_persistent_save_interval is not None:
        key = "ckpt_step" if cfg.checkpoint.ckpt_step is not None else "non_persistent_save_interval"
        raise InputError(f"checkpoint.{key}={getattr(cfg.checkpoint, key)!r}: a PLRD stage resumes from the newest "
                         "checkpoint in checkpoint.save, the step its metrics and ranks are kept for; leave it unset")
    if cfg.checkpoint.finetune:
        raise InputError("checkpoint.finetune=true: Bridge would load a resumed stage's weights alone and train it "
                         "again from step 0 over data it has read; a PLRD stage resumes its step, optimizer and data "
                         "position, so leave it false")
    if cfg.checkpoint.pretrained_checkpoint is not None:
        raise InputError(f"checkpoint.pretrained_checkpoint={cfg.checkpoint.pretrained_checkpoint!r}: a PLRD stage "
                         "starts from --hf-path or --parent; leave it unset")
    save, provider = Path(cfg.checkpoint.save), cfg.model  # a GPTModelProvider or GPTModelConfig: the
    # latter proxies its TransformerConfig's fields, so both read and take the same attributes here
    started = {"plrd": dataclasses.asdict(cfg.plrd), "hf_path": hf_path, "parent": parent,
               "train": {key: getattr(cfg.train, key) for key in DISTILLATION},  # the loss it trains with
               # the samples its checkpoint counts are of this data, cut and ordered so
               "dataset": {"blend": list(blend_lists(cfg.dataset.blend)), "split": cfg.dataset.split,
                           "random_seed": cfg.dataset.random_seed, "seq_length": cfg.dataset.seq_length},
               # a resumed stage continues its samples of the same stream (the count is in its checkpoint)
               **({"stream": [cfg.train.first_sample, cfg.train.stream_samples]} if cfg.train.in_stream else {})}
    saved = saved_iteration(save)  # an interrupted job's newest checkpoint
    resume = saved is not None
    if resume and not (save / PLAN_FILE).is_file():  # a stage writes its plan before any checkpoint
        raise InputError(f"checkpoint.save={str(save)!r} holds a checkpoint of a run that is not a PLRD stage (no "
                         f"{PLAN_FILE}); choose a new checkpoint.save")
    changed = _changed_settings(save, started) if resume else []
    if changed:
        raise InputError(f"checkpoint.save={str(save)!r} holds a stage started with other settings; rerun with "
                         f"the same to resume it, or choose a new checkpoint.save. Differences (then -> now): "
                         f"{'; '.join(changed)}")
    _add_pre_wrap_hook(provider, StageStart(save, saved, cfg.dataset.path_to_cache),  # before any that loads
                       first=True)  # or communicates
    if resume:
        check_shards(iteration_folder(save, saved))  # Bridge's load would fail midway on a shard cut short
        plan = read_plan(save)
        provider.transformer_layer_spec = functools.partial(low_rank_block_spec, ranks=plan.layer_ranks())
        cfg.checkpoint.load = str(save)
        if saved == train_iters(cfg.train):  # rerun once trained (its conversion failed): Bridge trains no step,
            cfg.checkpoint.save_interval = saved  # and saves at the end only off the interval, so not its last again
        return cfg
    # the parent as the stage's conversion and the next stage read it: refused now, not once the stage has trained
    arch, ranks, _ = describe_parent(parent or hf_path)
    check_tensor_parallel(arch, tp, "model.tensor_model_parallel_size")
    for key, length in (("dataset.seq_length", cfg.dataset.seq_length),
                        ("plrd.calibration.seq_length", cfg.plrd.calibration.seq_length)):
        check_sequence_length(arch, length, key)
    cfg.checkpoint.load = None  # a recipe's default would load another run into the decomposed model
    provider.perform_initialization = False  # the parent's weights replace it
    if parent is None:
        provider.transformer_layer_spec = functools.partial(low_rank_block_spec, ranks={})
        bridge = AutoBridge.from_hf_pretrained(hf_path, torch_dtype=provider.params_dtype)

        def load_parent(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
            bridge.load_hf_weights(model)
            return model
    else:
        if (arch.num_layers, arch.hidden_size) != (provider.num_layers, provider.hidden_size):
            raise InputError(f"parent {parent} has {arch.num_layers} layers of width {arch.hidden_size}; the job's "
                             f"model has {provider.num_layers} of {provider.hidden_size} (--hf-path {hf_path})")
        provider.transformer_layer_spec = functools.partial(low_rank_block_spec, ranks=ranks)

        def load_parent(model: list[torch.nn.Module]) -> list[torch.nn.Module]:
            load_checkpoint(model[0], parent)  # resharded to the job's TP size
            return model

    for hook in (load_parent, PLRDHook(cfg.plrd, cfg.dataset, hf_path, save, started)):
        _add_pre_wrap_hook(provider, hook)
    return cfg


def train_iters(train) -> Optional[int]:
    """The job's step count: ``train.train_iters``, or what Bridge derives from ``train.train_samples`` when it
    validates the job (after the stage is prepared); None for an epoch count."""
    return train.train_samples // train.global_batch_size if train.train_samples else train.train_iters


def _blend(data_path) -> tuple[list[str], Optional[list[float]]]:
    """``dataset.data_path`` as Megatron-LM's ``--data-path`` reads it (paths, or weights and paths interleaved,
    in a list or one string), the blend Bridge's ``finalize`` would make of it; the stage needs it before."""
    from megatron.core.datasets.utils import get_blend_from_list

    return get_blend_from_list(data_path.split() if isinstance(data_path, str) else list(data_path))


def _changed_settings(save: Path, started: dict) -> list[str]:
    """What differs between the settings ``save``'s stage started with and ``started`` (none when unrecorded)."""
    recorded = read_started(save)
    if recorded is None:
        return []
    return config_differences(recorded, started, {  # an older record's missing
        "plrd": field_defaults(PLRDConfig),  # keys, at their defaults
        "train": {key: field_defaults(PLRDTrainingConfig)[key] for key in DISTILLATION},
        "dataset": started["dataset"]})  # its data, which it did not record, taken as the same


def _add_pre_wrap_hook(model_config, hook, first: bool = False) -> None:
    """After the hooks already there (``first``: before them): a ``GPTModelProvider`` registers it, a
    megatron-training ``ModelConfig`` (megatron-core >= 0.19) lists it in ``pre_wrap_hooks``."""
    if hasattr(model_config, "register_pre_wrap_hook"):
        model_config.register_pre_wrap_hook(hook, prepend=first)
    else:
        model_config.pre_wrap_hooks.insert(0 if first else len(model_config.pre_wrap_hooks), hook)
