"""What distillation costs: a stage's training step with the LM loss vs with logit distillation (CPU).

    .venv/bin/python bench/kd_throughput.py [--keep 0.6] [--repeats 3] [--micro-batch 4 --seq-length 256]

SmolLM2-135M's architecture (random weights: speed does not depend on them), the student at
the member's uniform plan, the teacher the dense parent; the stages' own ``Trainer`` (TP=1, fp32)
with ``stage_loss("lm")`` and ``stage_loss("kd", teacher)``, one optimizer step each per round,
rounds interleaved, median seconds per step. KD adds the teacher's forward (no grad) and a
second softmax over the vocabulary; the teacher's weights are the extra memory.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.optimizer import OptimizerConfig
from timing import interleaved_medians  # bench/ is on sys.path when this runs as a script

from nemo_plrd.data import DataParallelBatches, token_samples
from nemo_plrd.distill import stage_loss
from nemo_plrd.model import SMOLLM2_135M, build_gpt
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.train import Schedule, Trainer
from nemo_plrd.transform import plan_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    args = parser.parse_args()
    init_model_parallel(1)

    steps = args.repeats + 1  # the warm-up round and the timed ones
    tokens = torch.randint(0, SMOLLM2_135M.vocab_size, (steps * args.micro_batch, args.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    teacher = build_gpt(SMOLLM2_135M).requires_grad_(False)
    ranks = plan_for(teacher, keep=args.keep).layer_ranks()
    trainers = {}
    for name, loss in (("lm", stage_loss("lm")), ("kd", stage_loss("kd", teacher))):
        batches = DataParallelBatches(token_samples(tokens), args.micro_batch, args.micro_batch, 0, 1)
        trainers[name] = Trainer(build_gpt(SMOLLM2_135M, ranks), OptimizerConfig(lr=1e-4, min_lr=1e-4),
                                 Schedule(steps, args.micro_batch, decay_style="constant"), batches, loss=loss)
    seconds = interleaved_medians({name: t.step for name, t in trainers.items()}, args.repeats)
    tokens_per_step = args.micro_batch * args.seq_length
    teacher_mib = sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20
    rows = [(name, f"{seconds[name]:.2f}", f"{tokens_per_step / seconds[name]:.0f}",
             f"{seconds[name] / seconds['lm']:.2f}", f"{teacher_mib:.0f}" if name == "kd" else "0")
            for name in trainers]
    print(f"SmolLM2-135M student at keep {args.keep:g}, micro-batch {args.micro_batch} x {args.seq_length} tokens, "
          f"fp32, TP=1, median of {args.repeats}")
    print(format_table(("loss", "s/step", "tokens/s", "time vs lm", "teacher MiB"), rows))


if __name__ == "__main__":
    main()
