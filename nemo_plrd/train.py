"""Continued pretraining at a new rank with megatron-core's own training pieces.

The step is the one Megatron-LM and Megatron-Bridge take: megatron's
``DistributedDataParallel`` (gradients reduced over data parallelism into ``main_grad``),
``finalize_model_grads`` (tensor-parallel reduction of the replicated factors' and norms'
gradients under sequence parallelism, tied embeddings), ``get_megatron_optimizer`` (Adam,
weight decay off for norms and biases, gradient clipping) and ``OptimizerParamScheduler``
(warm-up, then cosine / linear / WSD decay to ``min_lr``), counted in samples as megatron
counts them. A global batch is ``micro_batch`` x data-parallel size x the number of
micro-batches whose gradients accumulate, read in megatron's order (``DataParallelBatches``).
With ``OptimizerConfig.bf16`` it is megatron's mixed precision: ``Float16Module`` runs the model
in bf16 and hands back fp32 outputs, the optimizer keeps fp32 main weights (its checkpointed
state holds them), gradients accumulate where ``DistributedDataParallelConfig`` says.

``Trainer.state`` is everything a resumed run needs (model, optimizer, scheduler, iteration,
consumed samples, RNG) as one ``dist_checkpointing`` state dict, so an interrupted stage
continues from its last save and takes exactly the steps the uninterrupted run would.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig
from tqdm import tqdm

from nemo_plrd.data import DataParallelBatches
from nemo_plrd.errors import InputError
from nemo_plrd.files import append_line, write_text_atomic
from nemo_plrd.model import gpt_forward


# The distributed optimizer's state as each data-parallel rank holds it (its buffers, one tensor
# each): saved and loaded without gathering; megatron documents it as reshardable over data
# parallelism alone (a resumed stage keeps its TP: nemo_plrd.pipeline.claim).
# megatron-core's default, fully_sharded_model_space, fails in
# dist_checkpointing ("ShardedTensor.flattened_range is not supported"). Without Apex or TE the
# distributed optimizer is refused altogether (nemo_plrd.config.optimizer_config).
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass(frozen=True)
class Schedule:
    """How long and how the learning rate moves: ``steps`` optimizer steps of ``global_batch`` samples."""

    steps: int
    global_batch: int
    warmup_steps: int = 0
    decay_style: str = "cosine"  # megatron's lr_decay_style: constant, linear, cosine, WSD
    wsd_decay_steps: Optional[int] = None  # WSD: the final steps that decay (lr_wsd_decay_style linear)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` [b, s+1] under a GPTModel."""
    return gpt_forward(model, tokens[:, :-1], labels=tokens[:, 1:]).float().mean()


def masked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A GPTDataset micro-batch's mean loss over the tokens its loss mask keeps."""
    return masked_mean(gpt_forward(model, batch["tokens"], labels=batch["labels"]).float(), batch["loss_mask"])


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``per_token`` [b, s] over the tokens ``mask`` keeps; 0 where it keeps none (a sample all
    end-of-document tokens under eod_mask_loss), as megatron counts at least one token."""
    mask = mask.to(per_token.device)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def ddp_defaults(optimizer: OptimizerConfig) -> dict:
    """The DDP settings that follow the optimizer's, as in Megatron-Bridge: gradients reduce-scattered for a
    distributed optimizer, and accumulated and reduced in fp32 under bf16 (bf16 sums lose small updates)."""
    return {"use_distributed_optimizer": optimizer.use_distributed_optimizer, "grad_reduce_in_fp32": optimizer.bf16}


def check_loop_supports(optimizer: OptimizerConfig, ddp: DistributedDataParallelConfig) -> None:
    """What megatron's own training loop does and this one does not, refused naming the setting."""
    if optimizer.fp16:
        raise InputError("fp16 training needs loss scaling, which this loop does not do: use bf16 or fp32")
    if optimizer.loss_scale is not None:
        raise InputError(f"optimizer.loss_scale={optimizer.loss_scale} cannot be set: a stage's step does not scale "
                         "its loss (bf16 needs no loss scaling), so megatron would divide every gradient by it")
    if ddp.overlap_param_gather:  # megatron's loop forces that gather before it saves
        raise InputError("ddp.overlap_param_gather=true: a stage saves right after its optimizer step, before the next "
                         "forward pass would gather the distributed optimizer's updated shards; leave it false here "
                         "(a Megatron-Bridge stage takes it)")
    if ddp.num_distributed_optimizer_instances != 1:  # their process groups are megatron-training's
        raise InputError(f"ddp.num_distributed_optimizer_instances={ddp.num_distributed_optimizer_instances} must be 1 "
                         "here (a Megatron-Bridge stage takes more)")
    for key in ("use_megatron_fsdp", "use_custom_fsdp"):  # a stage wraps its model in megatron's plain DDP
        if getattr(ddp, key):
            raise InputError(f"ddp.{key}=true: a stage trains under megatron's DistributedDataParallel, not its FSDP; "
                             "leave it false here")


def _sgd_state(optimizer: torch.optim.SGD, config: Optional[OptimizerConfig] = None) -> None:
    """SGD's state as its first step makes it (a momentum buffer per parameter, where momentum is on): the keys a
    checkpoint's state is loaded into, as megatron's own function makes Adam's."""
    for group in optimizer.param_groups:
        if group["momentum"]:
            for param in group["params"]:
                optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


class Trainer:
    """One model's continued pretraining: megatron DDP, optimizer and scheduler over ``batches``."""

    def __init__(self, model: GPTModel, optimizer: OptimizerConfig, schedule: Schedule, batches: DataParallelBatches,
                 ddp: Optional[DistributedDataParallelConfig] = None,
                 loss: Callable[[torch.nn.Module, dict], torch.Tensor] = masked_loss):
        if optimizer.lr is None or optimizer.min_lr is None:
            raise ValueError("OptimizerConfig needs lr and min_lr: the schedule warms up to one and decays to the other")
        ddp = ddp or DistributedDataParallelConfig(**ddp_defaults(optimizer))
        if ddp.use_distributed_optimizer != optimizer.use_distributed_optimizer:
            raise ValueError("DistributedDataParallelConfig and OptimizerConfig disagree on use_distributed_optimizer")
        check_loop_supports(optimizer, ddp)
        self.model, self.schedule, self.batches, self.loss = model, schedule, batches, loss
        # bf16: the wrapper casts ``model`` itself to bf16 (the caller's .float() undoes it after training)
        module = Float16Module(_bf16(model.config), model) if optimizer.bf16 else model
        self.ddp = DistributedDataParallel(model.config, ddp, module=module)
        self.optimizer = get_megatron_optimizer(optimizer, [self.ddp])
        for chained in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if chained.init_state_fn is None and isinstance(chained.optimizer, torch.optim.SGD):
                chained.init_state_fn = _sgd_state  # megatron-core has none for SGD: its checkpoint would not load
        samples = schedule.global_batch
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=optimizer.lr, min_lr=optimizer.min_lr,
            lr_warmup_steps=schedule.warmup_steps * samples, lr_decay_steps=schedule.steps * samples,
            lr_decay_style=schedule.decay_style, start_wd=optimizer.weight_decay, end_wd=optimizer.weight_decay,
            wd_incr_steps=schedule.steps * samples, wd_incr_style="constant",
            wsd_decay_steps=None if schedule.wsd_decay_steps is None else schedule.wsd_decay_steps * samples,
            lr_wsd_decay_style="linear" if schedule.decay_style == "WSD" else None)
        self.iteration = 0

    @property
    def consumed_samples(self) -> int:
        return self.iteration * self.schedule.global_batch

    def step(self) -> dict[str, float]:
        """One optimizer step over the next global batch: its training loss (mean over every rank's micro-batches),
        the learning rate it used and the gradient norm before clipping."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro_batches = self.batches.micro_batches(self.consumed_samples)
        losses = []
        for batch in micro_batches:
            loss = self.loss(self.ddp, batch)
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        finalize_model_grads([self.ddp])
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.schedule.global_batch)
        self.iteration += 1
        loss = sum(losses) / len(micro_batches)  # on the model's device: NCCL reduces no CPU tensor
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return {"loss": loss.item() / parallel_state.get_data_parallel_world_size(), "lr": lr,
                "grad_norm": float(grad_norm)}

    def validate(self, batches: DataParallelBatches, iters: int) -> float:
        """Mean LM loss over the first ``iters`` global batches of ``batches`` (the valid split): the
        same samples at every validation, so the curve follows the model, not the data (and, whatever
        the training loss, compares across stages and runs)."""
        self.ddp.eval()
        with torch.no_grad():
            total = sum(masked_loss(self.ddp, batch) for index in range(iters)
                        for batch in batches.micro_batches(index * batches.global_batch))
        self.ddp.train()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total.item() / (iters * batches.num_micro_batches * parallel_state.get_data_parallel_world_size())

    def state(self, is_loading: bool = False) -> dict:
        """The resumable state as a ``dist_checkpointing`` state dict (model keys at the top level,
        so the checkpoint also loads as a plain model checkpoint)."""
        model = self.model.sharded_state_dict()
        optimizer = self.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)
        return {**model, "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(), "iteration": self.iteration, "rng": _rng_state()}

    def load_state(self, state: dict) -> None:
        """Restore what ``dist_checkpointing.load(self.state(is_loading=True), path)`` returned."""
        model_keys = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "iteration", "rng")}
        self.model.load_state_dict(model_keys)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = state["iteration"]
        _set_rng_state(state["rng"])


def _bf16(config: TransformerConfig) -> TransformerConfig:
    """``config`` marked bf16 for ``Float16Module`` alone: the model keeps the config it was built with."""
    config = copy.copy(config)
    config.bf16 = True
    return config


def _rng_state() -> ShardedObject:
    """This rank's RNG streams (torch's and megatron's tracker), one object per TP rank.

    Data-parallel ranks are seeded alike and draw alike, so they hold replicas (as in
    Megatron-LM's checkpoints): a run resumes at another data-parallel size.
    """
    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", state, (parallel_state.get_tensor_model_parallel_world_size(),),
                         (parallel_state.get_tensor_model_parallel_rank(),),
                         replica_id=parallel_state.get_data_parallel_rank())


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def keep_saved_steps(metrics: Path, iteration: int) -> None:
    """A resumed run takes the steps after its last checkpoint again: their old metric lines go, and
    so does a last line cut short by the interruption (always a step after the last save)."""
    if metrics.is_file():
        lines = metrics.read_text().splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        kept = [line for line in lines if json.loads(line)["step"] <= iteration]
        write_text_atomic(metrics, "".join(kept))


def run(trainer: Trainer, save: Callable[[Trainer], None], save_interval: int, metrics: Optional[Path],
        log_interval: int = 1, progress: bool = False, valid: Optional[DataParallelBatches] = None,
        eval_interval: int = 0, eval_iters: int = 0) -> None:
    """Train from ``trainer.iteration`` to the schedule's last step.

    ``save(trainer)`` runs every ``save_interval`` steps and after the last; with ``valid`` and
    ``eval_iters`` the validation loss is measured every ``eval_interval`` steps and after the
    last. Rank 0 appends one JSON line per ``log_interval`` steps (and per validation, and the last) to
    ``metrics`` (loss, lr, grad norm, tokens/s, consumed tokens, valid_loss) and shows them on the
    progress bar.
    """
    schedule = trainer.schedule
    tokens_per_step = schedule.global_batch * trainer.batches.dataset[0]["tokens"].numel()
    rank0 = dist.get_rank() == 0
    bar = tqdm(total=schedule.steps, initial=trainer.iteration, desc="train", unit="step", disable=not progress)
    seconds, first = 0.0, trainer.iteration
    while trainer.iteration < schedule.steps:
        start = time.perf_counter()
        figures = trainer.step()
        seconds += time.perf_counter() - start  # training time: saves are not counted
        tokens_per_s = (trainer.iteration - first) * tokens_per_step / seconds
        figures |= {"step": trainer.iteration, "tokens_per_s": tokens_per_s,
                    "consumed_tokens": trainer.iteration * tokens_per_step}
        last = trainer.iteration == schedule.steps
        if valid is not None and eval_iters and (last or eval_interval and trainer.iteration % eval_interval == 0):
            figures["valid_loss"] = trainer.validate(valid, eval_iters)
            if progress:
                bar.write(f"step {trainer.iteration}: validation loss {figures['valid_loss']:.4f}")
        if rank0 and metrics is not None and (trainer.iteration % log_interval == 0 or last or "valid_loss" in figures):
            append_line(metrics, json.dumps(figures))
        bar.update()
        bar.set_postfix(loss=f"{figures['loss']:.3f}", lr=f"{figures['lr']:.2e}", tokens_per_s=f"{tokens_per_s:.0f}")
        if trainer.iteration % save_interval == 0 or last:
            save(trainer)
    bar.close()


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, progress: Optional[tqdm] = None,
               group: Optional[dist.ProcessGroup] = None) -> float:
    """exp(mean next-token loss) over ``blocks`` [n, s+1] of held-out tokens (``progress`` advanced by
    each batch's predicted tokens). With a data-parallel ``group``, each of its ranks takes every
    group-size-th block (the model replicas need not all read every block) and the sums are added up."""
    rank, size = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    total = torch.zeros(2, dtype=torch.float64)  # the blocks' mean losses, summed; the number of blocks
    with torch.no_grad():
        for batch in shard(blocks, rank, size).split(batch_size):
            total += torch.tensor([lm_loss(model, batch).item() * batch.shape[0], batch.shape[0]], dtype=torch.float64)
            if progress is not None:
                progress.update(batch[:, 1:].numel())
    if size > 1:
        dist.all_reduce(total, group=group)
    return math.exp(total[0].item() / total[1].item())


def shard(blocks: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The blocks that data-parallel rank ``rank`` of ``size`` measures."""
    return blocks[rank::size]
