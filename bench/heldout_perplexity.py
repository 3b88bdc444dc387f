"""A stage's held-out perplexity at data-parallel size 2: every rank measuring every block vs the ranks splitting them.

    .venv/bin/torchrun --nproc_per_node 2 bench/heldout_perplexity.py [--blocks 8] [--repeats 3]

A local stage measures each member's held-out perplexity twice (decomposed and trained), 8 blocks of 512 tokens
per held-out corpus by default. Under torchrun at data-parallel size d, until 2026-12-07 every rank measured every
block, the same figure d times over; now each takes every d-th block and the sums are added up
(``nemo_plrd.train.perplexity``), so a measurement takes about 1/d of the time (the main job, one process with
two threads, is DP=1 and gains nothing). SmolLM2-135M's architecture at TP=1 x DP=2, one corpus's blocks (random
tokens: the time does not depend on them), both ways in turn on the same model.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from timing import interleaved_medians, speedup_table  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.evaluate import HELDOUT_BLOCK
from nemo_plrd.model import SMOLLM2_135M, build_gpt
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.train import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=positive_int, default=8, help="held-out blocks of one corpus")
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    init_model_parallel(1)
    if dist.get_world_size() != 2:
        parser.error("run it under torchrun --nproc_per_node 2 (TP=1 x DP=2)")
    model = build_gpt(SMOLLM2_135M).eval()
    blocks = torch.randint(0, SMOLLM2_135M.vocab_size, (args.blocks, HELDOUT_BLOCK),
                           generator=torch.Generator().manual_seed(0))
    group = parallel_state.get_data_parallel_group()
    figures = {}
    candidates = {"every rank": lambda: figures.__setitem__("every rank", perplexity(model, blocks)),
                  "split": lambda: figures.__setitem__("split", perplexity(model, blocks, group=group))}
    median = interleaved_medians(candidates, args.repeats)
    if dist.get_rank() == 0:
        print(f"SmolLM2-135M, {args.blocks} blocks of {HELDOUT_BLOCK - 1} predicted tokens, TP=1 x DP=2 (gloo), "
              f"{torch.get_num_threads()} thread(s) per rank; median of {args.repeats} interleaved rounds")
        print(speedup_table("held-out perplexity", ("each rank measures every block", median["every rank"]),
                            ("the ranks split the blocks (now)", median["split"])))
        print(f"perplexity: {figures['every rank']:.6f} (every block on each rank) vs {figures['split']:.6f} (split)")


if __name__ == "__main__":
    main()
