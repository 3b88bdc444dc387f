"""Forward+backward time of a low-rank slot vs its dense layer, beside the FLOP ratio.

    python bench/layer_speed.py [--repeats 15] [--device cuda --dtype bf16]

Dense ``ColumnParallelLinear`` / ``RowParallelLinear`` against ``LowRank*ParallelLinear``
(TP=1; fp32 on CPU, bf16 on a GPU with 32x the tokens), timed interleaved (dense, low-rank, dense, ...) and compared by
median, so machine noise hits both alike. The FLOP ratio r(m+n)/(mn) is what the factor
pair should cost; the target is time ratio <= 1.15 x FLOP ratio for r <= r*/2. "bare pair" times two plain
``F.linear`` calls on the same factors: the floor any implementation of the pair could reach
with these GEMMs, which separates the layers' own overhead from GEMM efficiency at thin shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from tp_comm import make_layer  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.slots import break_even_rank

# (shape name, slot, out, in, tokens, ranks)
CASES = [
    ("SmolLM2 fc1 (gate+up)", "linear_fc1", 3072, 576, 2048, (64, 128, 208, 320)),
    ("SmolLM2 fc2", "linear_fc2", 576, 1536, 2048, (52, 104, 208, 312)),
    ("7B fc1 (one of gate/up)", "linear_fc1", 11008, 4096, 256, (256, 512, 1024, 1536)),
    ("7B fc2", "linear_fc2", 4096, 11008, 256, (256, 512, 1024, 1536)),
]
GPU_TOKEN_SCALE = 32  # a GPU needs far more work per call than a CPU before launch latency stops mattering
CALLS_PER_SYNC = 10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fwd_bwd_seconds(layer, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Seconds per fwd+bwd; dy is made once, outside the clock (filling it costs a small GEMM).

    ``x.grad`` is dropped before each call: in a model the input gradient flows on to the
    previous layer, it is not summed into a buffer (an [s, b, in] add that would otherwise
    weigh the same on both contenders and pull their ratio toward 1). Weight gradients do
    accumulate, as they do over micro-batches.
    On a GPU, CALLS_PER_SYNC calls run between synchronisations, as in training, where the
    host queues kernels ahead of the device: a sync per call would time the host instead.
    """
    calls = CALLS_PER_SYNC if x.is_cuda else 1
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        x.grad = None
        y, _ = layer(x)
        y.backward(dy)
    synchronize()
    return (time.perf_counter() - start) / calls


def bare_pair(low_rank):
    """The same factors as two plain F.linear calls, in the layer's (output, bias) form."""
    return lambda x: (F.linear(F.linear(x, low_rank.down.weight), low_rank.up.weight), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on cpu, bf16 on cuda")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    init_model_parallel(1)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, {dtype}, TP=1; median of {args.repeats} interleaved runs")
    header = ("shape", "out x in", "tokens", "r", "r/r*", "FLOP ratio", "time ratio",
              "bare pair", "time/FLOP", "target")
    rows = []
    for name, slot, out, inp, tokens, ranks in CASES:
        tokens *= GPU_TOKEN_SCALE if cuda else 1
        config = TransformerConfig(num_layers=1, hidden_size=inp, num_attention_heads=1, params_dtype=dtype,
                                   use_cpu_initialization=not cuda)
        x = torch.randn(tokens, 1, inp, dtype=dtype, device=args.device, requires_grad=True)
        dy = torch.randn(tokens, 1, out, dtype=dtype, device=args.device)
        dense = make_layer(slot, out, inp, None, config)
        r_star = break_even_rank(out, inp)
        for rank in ranks:
            low_rank = make_layer(slot, out, inp, rank, config)
            contenders = {"dense": dense, "low": low_rank, "bare": bare_pair(low_rank)}
            times = {contender: [] for contender in contenders}
            for repeat in range(args.repeats + 1):  # the first round warms up
                for contender, layer in contenders.items():
                    seconds = fwd_bwd_seconds(layer, x, dy)
                    if repeat:
                        times[contender].append(seconds)
            median = {contender: statistics.median(t) for contender, t in times.items()}
            flop_ratio = rank * (out + inp) / (out * inp)
            time_ratio = median["low"] / median["dense"]
            target = "ok" if time_ratio <= 1.15 * flop_ratio else "MISS"
            rows.append((name, f"{out}x{inp}", tokens, rank, f"{rank / r_star:.2f}",
                         f"{flop_ratio:.3f}", f"{time_ratio:.3f}",
                         f"{median['bare'] / median['dense']:.3f}", f"{time_ratio / flop_ratio:.2f}",
                         target if rank <= r_star / 2 else "(r > r*/2)"))
    print(format_table(header, rows))


if __name__ == "__main__":
    main()
