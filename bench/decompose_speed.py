"""Wall time of the decomposition math beside torch.linalg.svd of the same matrices (2-core CPU).

    .venv/bin/python bench/decompose_speed.py [--repeats 3] [--repeats-large 1]

1. Every linear matrix of SmolLM2-135M's layers (210 HF matrices, real weights) at half its
   smaller dimension: our gather-free factorisation, plain (``svd``) and activation-aware
   (with a 576- or 1536-dim input statistic), against ``torch.linalg.svd`` of each matrix;
   all in float64 as ours computes.
2. Re-truncation (stage k -> k+1) of a 11008x4096 slot factored at rank 1024 down to 768,
   against a full SVD of the materialised product (float32, what one would otherwise do).
3. The randomized solver (``solver="randomized"``) against the exact one, activation-aware,
   at two ranks of a 11008x4096 slot: time, and the excess of its error over the optimum.
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians  # bench/ is on sys.path when this runs as a script
from transformers import AutoModelForCausalLM

from nemo_plrd.assets import smollm2_135m
from nemo_plrd.cli import positive_int
from nemo_plrd.decompose import column_factors, column_retruncate, column_spectrum
from nemo_plrd.report import format_table


def smollm2_matrices() -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(smollm2_135m(), dtype=torch.float32)
    return [p.detach().double() for name, p in model.named_parameters() if p.dim() == 2 and "layers." in name]


def spd(size: int, seed: int) -> torch.Tensor:
    x = torch.randn(size, 4 * size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.T / x.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds of the SmolLM2 comparison")
    parser.add_argument("--repeats-large", type=positive_int, default=1,
                        help="timed rounds of each 11008x4096 comparison (seconds to a minute each)")
    args = parser.parse_args()
    rows = []

    matrices = smollm2_matrices()
    covs = {n: spd(n, n) for n in {w.shape[1] for w in matrices}}
    half = lambda w: max(8, min(w.shape) // 2)

    def ours(activation: bool):
        for w in matrices:  # HF matrices: every one read as a column slot (input side)
            column_factors(w, half(w), input_cov=covs[w.shape[1]] if activation else None)

    times = interleaved_medians({
        "svd": lambda: ours(False), "activation": lambda: ours(True),
        "torch.linalg.svd": lambda: [torch.linalg.svd(w, full_matrices=False) for w in matrices],
    }, args.repeats)
    for name in ("svd", "activation"):
        rows.append((f"SmolLM2 {len(matrices)} matrices, {name}", f"{times[name]:.2f}",
                     f"{times['torch.linalg.svd']:.2f}", f"{times['torch.linalg.svd'] / times[name]:.1f}x"))

    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(11008, 1024, generator=gen), torch.randn(1024, 4096, generator=gen)
    times = interleaved_medians({
        "retruncate": lambda: column_retruncate(up, down, 768),
        "full svd": lambda: torch.linalg.svd(up @ down, full_matrices=False),
    }, args.repeats_large)
    rows.append(("re-truncate 11008x4096 r=1024 -> 768", f"{times['retruncate']:.2f}", f"{times['full svd']:.2f}",
                 f"{times['full svd'] / times['retruncate']:.1f}x"))

    weight = (torch.randn(11008, 4096, generator=gen) * torch.logspace(0, -3, 4096)).double()
    cov = spd(4096, 1)
    whitener = torch.linalg.cholesky(cov)  # ||(W - M) X||^2 = ||(W - M) S||_F^2
    spectrum = column_spectrum(weight, input_cov=cov)
    for rank in (128, 1024):
        factors = {}
        times = interleaved_medians({solver: lambda solver=solver: factors.update(
            {solver: column_factors(weight, rank, input_cov=cov, solver=solver)}) for solver in ("exact", "randomized")},
            args.repeats_large)
        best = spectrum[rank:].sum().item()
        excess = {solver: ((weight - up @ down) @ whitener).square().sum().item() / best - 1
                  for solver, (up, down) in factors.items()}
        rows.append((f"activation 11008x4096 r={rank}, randomized (error {excess['randomized']:+.2%}; "
                     f"exact {excess['exact']:+.2%})", f"{times['randomized']:.2f}", f"{times['exact']:.2f} (exact)",
                     f"{times['exact'] / times['randomized']:.1f}x"))
    print(format_table(("decomposition", "seconds", "baseline seconds", "speed-up"), rows))


if __name__ == "__main__":
    main()
