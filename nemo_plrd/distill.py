"""Logit distillation from a teacher (the parent or the previous member): KL(teacher || student), temperature 1.

Under TP both models' output layers leave each rank a [..., vocab / tp] slice of the logits
(megatron's ``parallel_output``). As megatron's vocab-parallel cross entropy does, the
vocabulary is never gathered: each softmax's max and normaliser take one all-reduce each over
the TP group, and so does each token's KL, summed over the ranks' slices:

    KL_t = sum_v p_t(v) (log p_t(v) - log p_s(v)),      dKL_t / dz_s(v) = p_s(v) - p_t(v)

and lm+kd's LM loss -log p_s(y_t) is read off the same log softmax by the rank whose slice holds
the label y_t (its gradient p_s - onehot(y_t)), summed in the KL's all-reduce; so the backward
needs no communication at all. Temperature 1 and KL on the logits alone, as
Minitron (arXiv 2407.14679) found best for recovering a compressed student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plrd.checkpoint import describe_parent, load_parent
from nemo_plrd.errors import InputError
from nemo_plrd.model import LlamaArch, gpt_forward, parameter_count
from nemo_plrd.train import masked_loss, masked_mean

LOSSES = ("lm", "kd", "lm+kd")
Loss = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the vocabulary split across ``group``'s ranks, this rank's slice [..., v/tp] back.

    torch's fused row-wise kernel normalises the local slice in one pass over the logits (max, subtract,
    exp, sum and subtract took five, each [b, s, v/tp] in and out of memory). A row's local
    log-normaliser is then one element's difference, and the ranks' combine in two all-reduces of
    [...] elements (none at TP=1)."""
    local = torch.log_softmax(logits, dim=-1)
    if dist.get_world_size(group) == 1:
        return local
    normaliser = logits[..., 0] - local[..., 0]  # [...]: log sum_v exp(z_v) over this rank's slice
    high = normaliser.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    total = (normaliser - high).exp()
    dist.all_reduce(total, group=group)
    return local.sub_((high + total.log() - normaliser).unsqueeze(-1))


class _VocabParallelDistillation(torch.autograd.Function):
    """Per-token ``kd_weight`` x KL(teacher || student), plus the LM loss -log p_s(label) where labels are
    given, from vocab-parallel logits [..., v / tp]. The LM loss reads the student's log softmax the KL
    computed already, so lm+kd takes one softmax of the student, not two, and keeps one [..., v / tp]
    tensor for the backward, not two (megatron's cross entropy would normalise the logits again and
    keep its softmax, written over them). Forward: 2 + 2 + 1
    all-reduces of [...] elements (each softmax's max and normaliser, the loss; only the loss's at TP=1),
    backward: none."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor],
                kd_weight: float, group) -> torch.Tensor:
        log_student = _log_softmax(student.float(), group)  # [..., v/tp]
        log_teacher = _log_softmax(teacher.float(), group)
        p_teacher = log_teacher.exp()
        loss = log_teacher.sub_(log_student).mul_(p_teacher).sum(dim=-1).mul_(kd_weight)  # [...]: this rank's share
        if labels is not None:  # the rank whose slice holds a token's label adds its -log p_s(label)
            width = log_student.shape[-1]
            local = labels.to(student.device) - dist.get_rank(group) * width  # [...]
            held = ((local >= 0) & (local < width)).to(loss.dtype)
            index = local.clamp(0, width - 1).unsqueeze(-1)
            loss.sub_(log_student.gather(-1, index).squeeze(-1).mul_(held))
        dist.all_reduce(loss, group=group)
        # d loss / dz_s = kd_weight (p_s - p_t) + (p_s - onehot(label)) where labels are given, [..., v/tp]
        gradient = log_student.exp_().mul_(kd_weight + (labels is not None)).sub_(p_teacher.mul_(kd_weight))
        if labels is not None:
            gradient.scatter_add_(-1, index, held.neg().unsqueeze(-1))
        ctx.save_for_backward(gradient)
        ctx.dtype = student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return (gradient * grad.unsqueeze(-1)).to(ctx.dtype), None, None, None, None


def check_teacher(student: LlamaArch, teacher: LlamaArch, student_tokenizer: dict, teacher_tokenizer: dict,
                  where: str) -> None:
    """A teacher must be the student's architecture (ranks aside) with the student's tokenizer: its
    logits are compared token by token over the same vocabulary."""
    if teacher != student:
        differ = [f"{name} {getattr(teacher, name)} vs {getattr(student, name)}"
                  for name in student.__dataclass_fields__ if getattr(teacher, name) != getattr(student, name)]
        raise InputError(f"{where}: the teacher's architecture differs from the student's ({', '.join(differ)}); "
                         "distill from the parent or the previous member of the same family")
    if teacher_tokenizer != student_tokenizer:
        raise InputError(f"{where}: the teacher's tokenizer differs from the student's; their logits would "
                         "not index the same tokens")


def check_teacher_source(student: Path, teacher: Path, where: str) -> None:
    """``check_teacher`` on two PLRD checkpoints or HF model directories, from their configs alone
    (before any work: a mismatch is refused before hours of decomposition)."""
    from nemo_plrd.hf import hf_tokenizer

    student_arch, _, student_hf = describe_parent(student)
    try:
        teacher_arch, _, teacher_hf = describe_parent(teacher)
    except InputError as error:  # a path or model refused as a parent would be: named as the teacher
        raise type(error)(f"{where}: {error}") from None
    check_teacher(student_arch, teacher_arch, hf_tokenizer(student_hf).get_vocab(),
                  hf_tokenizer(teacher_hf).get_vocab(), where)  # loaded by describe_parent


def load_teacher(source: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The teacher from a PLRD checkpoint or an HF model directory, at megatron's current TP size, frozen, its
    weights in ``dtype`` (the student's training precision: bf16 halves its memory and its forward's time)."""
    teacher, _, _ = load_parent(source)
    teacher.to(dtype)
    teacher.requires_grad_(False)
    teacher.eval()
    if dist.get_rank() == 0:
        print(f"teacher {source}: {parameter_count(teacher):,} parameters, "
              f"{sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20:.0f} MiB on this rank",
              flush=True)
    return teacher


def distillation_loss(kind: str, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      kd_weight: float = 1.0) -> torch.Tensor:
    """Per-token loss [b, s] of ``kind`` from the student's and the teacher's vocab-parallel logits
    [b, s, v / tp], on megatron's TP group: kd, the KL; lm+kd, the LM loss + ``kd_weight`` x KL."""
    if kind not in ("kd", "lm+kd"):
        raise ValueError(f"distillation loss {kind!r}: kd or lm+kd")
    if logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                         "differ")
    lm = kind == "lm+kd"
    return _VocabParallelDistillation.apply(logits, teacher_logits.detach(), labels if lm else None,
                                            kd_weight if lm else 1.0, parallel_state.get_tensor_model_parallel_group())


def stage_loss(kind: str, teacher: Optional[torch.nn.Module] = None, kd_weight: float = 1.0) -> Loss:
    """The training loss of a micro-batch, mean over the tokens its loss mask keeps: the LM loss, the
    KL to ``teacher``'s logits (forward in no-grad), or LM (from the same logits) + ``kd_weight`` x KL."""
    if kind not in LOSSES:
        raise InputError(f"train.loss={kind!r} is not one of {list(LOSSES)}")
    if (kind != "lm") != (teacher is not None):
        raise ValueError(f"loss {kind!r} {'needs' if kind != 'lm' else 'takes no'} teacher")
    if kind == "lm":
        return masked_loss  # megatron's own loss path (GPTModel given labels), as without distillation

    teacher.eval()

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = gpt_forward(model, batch["tokens"])  # [b, s, v/tp]
        with torch.no_grad():
            teacher_logits = gpt_forward(teacher, batch["tokens"])
        per_token = distillation_loss(kind, logits, teacher_logits, batch["labels"], kd_weight)
        return masked_mean(per_token, batch["loss_mask"])

    return loss
