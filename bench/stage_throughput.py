"""Training throughput of each family member vs the dense parent, beside the FLOP ratio (CPU).

    .venv/bin/python bench/stage_throughput.py [--keep 0.6 0.4 0.25] [--repeats 3]
                                               [--micro-batch 4 --seq-length 256] [--profile]

SmolLM2-135M's architecture (random weights: speed does not depend on them), dense and at each
member's uniform plan (``plan_for(keep=...)``, as the family recipe plans it), each trained by
the stages' own ``Trainer`` (megatron DDP, optimizer and scheduler; TP=1, fp32) on synthetic
tokens. One optimizer step per model per round, rounds interleaved (dense, members, dense,
...), median seconds per step. The FLOP ratio is the member's training FLOPs per token over
the dense model's: 3 x the forward's, as the family's plan table counts it
(``family_plan.forward_flops_per_token``: 2 per weight of every block matrix and of the LM head,
plus 4 x hidden per layer per attended position over the causal context), which the rank
reduces only in part. Target: time ratio <= 1.15 x FLOP ratio. ``--profile`` adds
where a step's time goes (torch's profiler: matrix products vs everything else: the optimizer
step, cross-entropy over the vocabulary, norms, attention, gradient buffers) and the ceiling:
the time / FLOP ratio the member would reach if its matrix products took exactly the dense
model's matrix time x the FLOP ratio and everything else stayed as measured.
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.optimizer import OptimizerConfig
from timing import interleaved_medians, matmul_split  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.data import DataParallelBatches, token_samples
from nemo_plrd.family_plan import forward_flops_per_token, parent_plan
from nemo_plrd.model import SMOLLM2_135M, build_gpt, parameter_count
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.train import Schedule, Trainer
from nemo_plrd.transform import plan_for

ARCH = SMOLLM2_135M


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.4, 0.25])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--micro-batch", type=positive_int, default=4)
    parser.add_argument("--seq-length", type=positive_int, default=256)
    parser.add_argument("--profile", action="store_true", help="also split a step's time: matmuls vs the rest")
    args = parser.parse_args()
    init_model_parallel(1)

    steps = args.repeats + 1 + args.profile  # the warm-up round, the timed ones, the profiled one
    tokens = torch.randint(0, ARCH.vocab_size, (steps * args.micro_batch, args.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    dense = build_gpt(ARCH)
    plans = {"dense": parent_plan(ARCH)} | {f"keep {keep:g}": plan_for(dense, keep=keep) for keep in args.keep}
    models = {"dense": dense} | {name: build_gpt(ARCH, plan.layer_ranks()) for name, plan in plans.items()
                                 if name != "dense"}
    trainers = {name: Trainer(model, OptimizerConfig(lr=1e-4, min_lr=1e-5),
                              Schedule(steps, args.micro_batch, decay_style="constant"),
                              DataParallelBatches(token_samples(tokens), args.micro_batch, args.micro_batch, 0, 1))
                for name, model in models.items()}
    seconds = interleaved_medians({name: t.step for name, t in trainers.items()}, args.repeats)
    splits = {name: matmul_split(t.step) for name, t in trainers.items()} if args.profile else {}

    step_tokens = args.micro_batch * args.seq_length
    flops = {name: 3 * forward_flops_per_token(plan, ARCH, args.seq_length) for name, plan in plans.items()}
    rows, profiled = [], []
    for name, model in models.items():
        time_ratio, flop_ratio = seconds[name] / seconds["dense"], flops[name] / flops["dense"]
        rows.append((name, f"{parameter_count(model) / 1e6:.1f}M", f"{step_tokens / seconds[name]:.0f}",
                     f"{time_ratio:.3f}", f"{flop_ratio:.3f}", f"{time_ratio / flop_ratio:.2f}"))
        if splits:
            (dense_mm, dense_rest), (mm, rest) = splits["dense"], splits[name]
            ceiling = (dense_mm * flop_ratio + rest) / (dense_mm + dense_rest) / flop_ratio
            profiled.append((name, f"{mm:.2f}", f"{rest:.2f}", f"{rest / (mm + rest):.0%}",
                             f"{dense_mm / mm:.2f}x", f"{ceiling:.2f}"))
    print(f"SmolLM2-135M architecture, one training step of {args.micro_batch}x{args.seq_length} tokens, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    print(format_table(("model", "params", "tokens/s", "time ratio", "FLOP ratio",
                        "time / FLOP ratio (target <= 1.15)"), rows))
    if profiled:
        print("\none step profiled (seconds):")
        print(format_table(("model", "matmuls", "other ops", "other share", "matmul speed-up vs dense",
                            "ceiling: time / FLOP ratio"), profiled))


if __name__ == "__main__":
    main()
