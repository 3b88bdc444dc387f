"""Logit distillation under TP: the vocab-parallel losses and their gradients equal the single-process ones (fp32)."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from nemo_plrd.data import DataParallelBatches, token_samples
from nemo_plrd.distill import distillation_loss, stage_loss
from nemo_plrd.model import LlamaArch, build_gpt, gpt_forward
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.train import Schedule, Trainer
from tp_utils import tp_chunk, tp_gather

ARCH = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                 num_query_groups=2, vocab_size=128, max_sequence_length=64)
TOKENS = torch.randint(0, ARCH.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
BATCH = {"tokens": TOKENS[:, :-1], "labels": TOKENS[:, 1:],
         "loss_mask": (torch.arange(16) % 5 != 0).float().expand(2, 16)}  # some positions masked out


def reference_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, float64, the whole vocabulary in one process."""
    return F.kl_div(F.log_softmax(student.double(), -1), F.log_softmax(teacher.double(), -1), log_target=True,
                    reduction="none").sum(-1)


@pytest.mark.parametrize("kind", ["kd", "lm+kd"])
@pytest.mark.parametrize("tp", [1, 2])
def test_the_vocab_parallel_loss_and_its_gradient_equal_the_full_vocabulary_ones(tp, kind):
    """kd: the KL; lm+kd: the cross entropy + 0.5 x the KL, both read off one log softmax of the student."""
    init_model_parallel(tp)
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 5, 128, generator=gen) * 4, torch.randn(3, 5, 128, generator=gen) * 4
    student[..., 0] -= 40  # each slice's normaliser is read off its first logit: far below the rest here
    teacher[..., 64] += 40  # and a rank's slice that holds almost all of a softmax's mass
    labels = torch.randint(0, 128, (3, 5), generator=gen)
    assert (labels < 64).any() and (labels >= 64).any()  # at TP=2, each rank holds some tokens' labels
    weights = torch.rand(3, 5, generator=gen)
    shard = tp_chunk(student, -1).clone().requires_grad_()
    loss = distillation_loss(kind, shard, tp_chunk(teacher, -1), labels, kd_weight=0.5)
    (loss * weights).sum().backward()
    full = student.clone().requires_grad_()
    expected = reference_kl(full, teacher)
    if kind == "lm+kd":
        expected = 0.5 * expected + F.cross_entropy(full.double().flatten(0, 1), labels.flatten(),
                                                    reduction="none").view(3, 5)
    (expected * weights).sum().backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shard.grad, tp_chunk(full.grad, -1).float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tp", [1, 2])
def test_kd_loss_of_a_tiny_model_equals_the_reference_kl_of_its_gathered_logits(tp):
    init_model_parallel(tp, seed=3)
    student = build_gpt(ARCH, {"linear_qkv": 16, "linear_proj": 8, "linear_fc1": 24, "linear_fc2": 11})
    teacher = build_gpt(ARCH)  # dense, other weights
    mask = BATCH["loss_mask"]
    with torch.no_grad():
        per_token = reference_kl(tp_gather(gpt_forward(student, BATCH["tokens"]), -1),
                                 tp_gather(gpt_forward(teacher, BATCH["tokens"]), -1))
        lm = gpt_forward(student, BATCH["tokens"], labels=BATCH["labels"]).double()
        kd = stage_loss("kd", teacher)(student, BATCH)
        both = stage_loss("lm+kd", teacher, kd_weight=0.5)(student, BATCH)
    expected = (per_token * mask).sum() / mask.sum()
    assert expected > 0.01  # the two models differ: a real comparison
    torch.testing.assert_close(kd.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(both.double(), ((lm + 0.5 * per_token) * mask).sum() / mask.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("tp", [1, 2])
def test_training_on_the_kd_loss_brings_the_student_to_its_teacher(tp):
    """megatron's Trainer on stage_loss('kd'): the same global batch again and again, the KL falls 5x."""
    init_model_parallel(tp, seed=3)
    student = build_gpt(ARCH, {"linear_qkv": 16, "linear_proj": 8, "linear_fc1": 24, "linear_fc2": 11})
    teacher = build_gpt(ARCH)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    steps = 12
    batches = DataParallelBatches(token_samples(TOKENS.repeat(steps, 1)), 2 // dp, 2, dp_rank, dp)
    trainer = Trainer(student, OptimizerConfig(lr=1e-2, min_lr=1e-2), Schedule(steps, 2, decay_style="constant"),
                      batches, loss=stage_loss("kd", teacher))
    kl = [trainer.step()["loss"] for _ in range(steps)]
    assert kl[0] > 0.01 and kl[-1] < kl[0] / 5, kl
