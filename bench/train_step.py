"""What a stage's training step costs: the LM loss vs distillation, fp32 vs bf16 mixed precision (CPU).

    .venv/bin/python bench/train_step.py [--keep 0.6] [--repeats 3] [--micro-batch 4 --seq-length 256]
                                         [--fp32-only]

SmolLM2-135M's architecture (random weights: speed does not depend on them), the student at
the member's uniform plan, the teacher the dense parent; the stages' own ``Trainer`` (TP=1)
with ``stage_loss("lm")`` and ``stage_loss("lm+kd", teacher)``, each in fp32 and in
``mixed_precision=bf16_mixed`` (megatron's ``Float16Module`` and fp32 main weights in the
optimizer; the teacher's weights in bf16 too, as a stage loads it). One optimizer step each
per round, rounds interleaved, median seconds per step. Distillation adds the teacher's forward
(no grad) and a second softmax over the vocabulary; the teacher's weights are the extra memory.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.optimizer import OptimizerConfig
from timing import interleaved_medians  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.data import DataParallelBatches, token_samples
from nemo_plrd.distill import stage_loss
from nemo_plrd.model import SMOLLM2_135M, build_gpt
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.train import Schedule, Trainer
from nemo_plrd.transform import plan_for

PRECISIONS = {"fp32": torch.float32, "bf16_mixed": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--micro-batch", type=positive_int, default=4)
    parser.add_argument("--seq-length", type=positive_int, default=256)
    parser.add_argument("--fp32-only", action="store_true",
                        help="on a CPU without AVX-512 bf16, where bf16 matrix products crawl")
    args = parser.parse_args()
    precisions = ["fp32"] if args.fp32_only else list(PRECISIONS)
    init_model_parallel(1)

    steps = args.repeats + 1  # the warm-up round and the timed ones
    tokens = torch.randint(0, SMOLLM2_135M.vocab_size, (steps * args.micro_batch, args.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    teachers = {precision: build_gpt(SMOLLM2_135M).requires_grad_(False).to(PRECISIONS[precision])
                for precision in precisions}
    ranks = plan_for(teachers["fp32"], keep=args.keep).layer_ranks()
    trainers = {}
    for precision in precisions:
        for loss in ("lm", "lm+kd"):
            batches = DataParallelBatches(token_samples(tokens), args.micro_batch, args.micro_batch, 0, 1)
            trainers[loss, precision] = Trainer(
                build_gpt(SMOLLM2_135M, ranks),
                OptimizerConfig(lr=1e-4, min_lr=1e-4, bf16=PRECISIONS[precision] == torch.bfloat16),
                Schedule(steps, args.micro_batch, decay_style="constant"), batches,
                loss=stage_loss(loss, teachers[precision] if loss != "lm" else None))
    seconds = interleaved_medians({name: t.step for name, t in trainers.items()}, args.repeats)
    tokens_per_step = args.micro_batch * args.seq_length
    base = seconds["lm", "fp32"]
    rows = []
    for (loss, precision), s in seconds.items():
        teacher_mib = sum(p.numel() * p.element_size() for p in teachers[precision].parameters()) / 2**20
        rows.append((loss, precision, f"{s:.2f}", f"{tokens_per_step / s:.0f}", f"{s / base:.2f}",
                     f"{seconds[loss, 'fp32'] / s:.2f}x", f"{teacher_mib:.0f}" if loss != "lm" else "0"))
    print(f"SmolLM2-135M student at keep {args.keep:g}, micro-batch {args.micro_batch} x {args.seq_length} tokens, "
          f"TP=1, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(format_table(("loss", "precision", "s/step", "tokens/s", "time vs lm fp32", "bf16 speed-up",
                        "teacher MiB"), rows))


if __name__ == "__main__":
    main()
