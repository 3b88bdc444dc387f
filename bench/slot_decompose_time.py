"""Seconds to decompose one slot of each 7B recipe's shapes (activation-aware, exact solver), 2-core CPU.

    .venv/bin/python bench/slot_decompose_time.py        # ~4 min on 2 cores

The scale sheet (docs/scale.md) multiplies these by the layers: a stage decomposes its slots one
after the other (layer by layer, as calibration flows). Random weights and a random
well-conditioned input covariance: the time depends on the shapes and the rank only. The work
per slot is float64 products of the weight with in x in (column) or out x out (row) matrices and
one eigendecomposition of a 4096 x 4096 matrix, the same on every TP rank (gather-free), so TP
does not shorten it; a GPU does (float64 on an H100/H200: ~60 TFLOP/s against ~0.05 here).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from nemo_plrd.decompose import column_factors, row_factors
from nemo_plrd.family_plan import load_family, recipe_plan
from nemo_plrd.report import format_table
from nemo_plrd.slots import COLUMN, SLOTS


def seconds(shape: tuple[int, int], rank: int, kind: str) -> float:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
    side = shape[1] if kind == COLUMN else shape[0]
    basis = torch.randn(side, side, generator=gen, dtype=torch.float64)
    cov = basis @ basis.T / side + torch.eye(side, dtype=torch.float64)  # SPD, as calibration gives
    start = time.perf_counter()
    if kind == COLUMN:
        column_factors(weight, rank, input_cov=cov)
    else:
        row_factors(weight, rank, output_cov=cov)
    return time.perf_counter() - start


RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    rows = []
    for name in ("llama2_7b_family.yaml", "mistral_7b_family.yaml"):
        arch, _, stages = recipe_plan(load_family(str(RECIPES / name)))
        total = 0.0
        for slot, shape in arch.slot_shapes().items():
            rank = stages[0].plan.rank(0, slot)
            t = seconds(shape, rank, SLOTS[slot][1])
            total += t
            rows.append((name, slot, f"{shape[0]}x{shape[1]}", rank, f"{t:.1f}"))
        rows.append((name, "one layer", "", "", f"{total:.1f}"))
        rows.append((name, f"{arch.num_layers} layers", "", "",
                     f"{total * arch.num_layers / 60:.1f} min"))
    print(format_table(("recipe", "slot", "shape", "stage-1 rank", "seconds (CPU)"), rows))


if __name__ == "__main__":
    main()
