"""Throughput of each GEMM of a dense slot's and its factor pair's forward+backward, one at a time.

    python bench/gemm_shapes.py [--repeats 15]

Explains the floor under ``layer_speed.py``: if the pair's six thin GEMMs (a dimension of r)
run at a lower FLOP rate than the dense slot's three, no layer built on them can reach the
FLOP ratio. Each GEMM runs alone on preallocated operands (the best case: no autograd, warm
caches), timed interleaved with the others; "sum" is what the pair's six cost against the
dense three, beside the FLOP ratio.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from timing import interleaved_medians  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.report import format_table

TOKENS = 2048
# (shape name, out, in, ranks): the SmolLM2 slots of layer_speed at r*/8, r*/4, r*/2
CASES = [("SmolLM2 fc1 (gate+up)", 3072, 576, (64, 128, 208)), ("SmolLM2 fc2", 576, 1536, (52, 104, 208))]


def gemms(out: int, inp: int, rank: int | None) -> dict[str, tuple[Callable[[], torch.Tensor], int]]:
    """name -> (the product, its FLOPs) for the forward+backward of y = x W^T, or of y = (x V^T) U^T."""
    x, dy = torch.randn(TOKENS, inp), torch.randn(TOKENS, out)
    if rank is None:
        w = torch.randn(out, inp)
        flops = 2 * TOKENS * out * inp
        return {"y = x W^T": (lambda: x @ w.t(), flops), "dx = dy W": (lambda: dy @ w, flops),
                "dW = dy^T x": (lambda: dy.t() @ x, flops)}
    down, up = torch.randn(rank, inp), torch.randn(out, rank)
    h, dh = torch.randn(TOKENS, rank), torch.randn(TOKENS, rank)
    flops_in, flops_out = 2 * TOKENS * rank * inp, 2 * TOKENS * rank * out
    return {"h = x V^T": (lambda: x @ down.t(), flops_in), "y = h U^T": (lambda: h @ up.t(), flops_out),
            "dh = dy U": (lambda: dy @ up, flops_out), "dU = dy^T h": (lambda: dy.t() @ h, flops_out),
            "dx = dh V": (lambda: dh @ down, flops_in), "dV = dh^T x": (lambda: dh.t() @ x, flops_in)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=15)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"CPU, {torch.get_num_threads()} threads, fp32, {TOKENS} tokens; median of {args.repeats} interleaved runs")
    rows = []
    for name, out, inp, ranks in CASES:
        for rank in ranks:
            products = {("dense", k): v for k, v in gemms(out, inp, None).items()}
            products |= {("pair", k): v for k, v in gemms(out, inp, rank).items()}
            seconds = interleaved_medians({key: run for key, (run, _) in products.items()}, args.repeats)
            dense_time, pair_time = (sum(s for (who, _), s in seconds.items() if who == side)
                                     for side in ("dense", "pair"))
            dense_rate = sum(flops for (who, _), (_, flops) in products.items() if who == "dense") / dense_time
            for (who, gemm), (_, flops) in products.items():
                rate = flops / seconds[(who, gemm)]
                rows.append((name, rank, who, gemm, f"{seconds[(who, gemm)] * 1e3:.2f}", f"{rate / 1e9:.0f}",
                             f"{rate / dense_rate:.2f}"))
            flop_ratio = rank * (out + inp) / (out * inp)
            rows.append((name, rank, "sum", f"time ratio {pair_time / dense_time:.3f}", f"FLOP ratio {flop_ratio:.3f}",
                         "", f"{pair_time / dense_time / flop_ratio:.2f}"))
    print(format_table(("shape", "r", "", "GEMM", "ms", "GFLOP/s", "rate / dense (sum: time/FLOP)"), rows))


if __name__ == "__main__":
    main()
