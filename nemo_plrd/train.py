"""The training step megatron's own loop performs, spelled out for CPU runs and tests.

On GPUs the Megatron-Bridge loop trains (``pretrain``). On CPUs megatron's distributed
optimizer hard-codes CUDA tensors, so this module keeps megatron's DDP and gradient
finalisation (DP all-reduce, TP all-reduce of ``sequence_parallel`` grads, tied
embeddings) and steps a torch AdamW over the finalised ``main_grad`` s.
"""

from __future__ import annotations

import math
import time

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.gpt import GPTModel
from tqdm import tqdm

from nemo_plrd.model import gpt_forward


def wrap_ddp(model: GPTModel) -> DistributedDataParallel:
    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``tokens`` [b, s+1] under a GPTModel."""
    return gpt_forward(model, tokens[:, :-1], labels=tokens[:, 1:]).float().mean()


def train_step(
    model: DistributedDataParallel, optimizer: torch.optim.Optimizer, tokens: torch.Tensor
) -> float:
    """One optimizer step on one batch; returns the loss before the step."""
    model.zero_grad_buffer()
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model, tokens)
    loss.backward()
    finalize_model_grads([model])
    for param in model.parameters():
        if param.requires_grad:
            param.grad = param.main_grad
    optimizer.step()
    return loss.item()


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then a cosine from 1 to 0.1 over the remaining steps (Megatron's ``cosine`` decay)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def continue_pretraining(model: GPTModel, blocks: torch.Tensor, micro_batch: int, lr: float, warmup_steps: int = 0,
                         progress: bool = False) -> list[float]:
    """Train ``model`` in place, one step per ``micro_batch`` rows of ``blocks`` [n, s+1]; the losses, step by step."""
    ddp = wrap_ddp(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=lr)
    batches = blocks.split(micro_batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, len(batches), warmup_steps))
    losses = []
    bar = tqdm(batches, desc="train", unit="step", disable=not progress)
    start = time.perf_counter()
    for step, batch in enumerate(bar):
        losses.append(train_step(ddp, optimizer, batch))
        schedule.step()
        tokens_per_s = (step + 1) * batch[:, 1:].numel() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tokens_per_s=f"{tokens_per_s:.0f}")
    return losses


def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token loss) over ``blocks`` [n, s+1] of held-out tokens."""
    with torch.no_grad():
        losses = [lm_loss(model, batch).item() * batch.shape[0] for batch in blocks.split(batch_size)]
    return math.exp(sum(losses) / blocks.shape[0])
