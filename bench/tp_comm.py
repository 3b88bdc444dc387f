"""Tensor-parallel communication of a dense slot vs its low-rank replacement.

    torchrun --nproc_per_node 2 bench/tp_comm.py [--tokens-per-step 8192]

Counts the bytes of every collective on the TP group in one forward+backward of each
layer (activation collectives: they grow with tokens) and, under sequence parallelism,
in megatron's gradient finalisation (the replicated factor's gradient all-reduce: once
per optimizer step, whatever the number of tokens). The activation ratio must be r/in
for column slots and r/out for row slots; the script exits non-zero if any is off by >1%.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_plrd.cli import positive_int
from nemo_plrd.comm import CollectiveMeter
from nemo_plrd.layers import LowRankColumnParallelLinear, LowRankRowParallelLinear
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table

# (model, slot, out, in, rank): megatron's fused shapes (qkv, gate+up in fc1).
CASES = [
    ("SmolLM2-135M", "linear_qkv", 960, 576, 176),
    ("SmolLM2-135M", "linear_proj", 576, 576, 144),
    ("SmolLM2-135M", "linear_fc1", 3072, 576, 256),
    ("SmolLM2-135M", "linear_fc2", 576, 1536, 208),
    ("LLaMA-2-7B", "linear_qkv", 12288, 4096, 1024),
    ("LLaMA-2-7B", "linear_fc2", 4096, 11008, 1024),
]
COLUMN_SLOTS = {"linear_qkv", "linear_fc1"}
SEQ, BATCH = 128, 2


def make_layer(slot: str, out: int, inp: int, rank: int | None, config: TransformerConfig):
    tp_group = parallel_state.get_tensor_model_parallel_group()
    common = dict(config=config, init_method=torch.nn.init.normal_, bias=False, tp_group=tp_group)
    rank_kw = {} if rank is None else {"rank": rank}
    if slot in COLUMN_SLOTS:
        cls = ColumnParallelLinear if rank is None else LowRankColumnParallelLinear
        return cls(inp, out, gather_output=False, **rank_kw, **common)
    cls = RowParallelLinear if rank is None else LowRankRowParallelLinear
    return cls(inp, out, input_is_parallel=True, skip_bias_add=False, **rank_kw, **common)


def measure(slot, out, inp, rank, sequence_parallel) -> tuple[CollectiveMeter, CollectiveMeter]:
    """The collectives of one fwd+bwd (activations), and of megatron's gradient finalisation."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = TransformerConfig(
        num_layers=1, hidden_size=inp, num_attention_heads=tp, tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel, use_cpu_initialization=True,
    )
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(), make_layer(slot, out, inp, rank, config)
    )
    seq = SEQ // tp if (sequence_parallel and slot in COLUMN_SLOTS) else SEQ
    width = inp if slot in COLUMN_SLOTS else inp // tp
    x = torch.randn(seq, BATCH, width, requires_grad=True)
    with CollectiveMeter().measure() as activations:
        y, _ = model(x)
        y.square().sum().backward()
    with CollectiveMeter().measure() as gradients:
        finalize_model_grads([model])
    return activations, gradients


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens-per-step", type=positive_int, default=8192,
                        help="tokens per optimizer step per TP group, for the gradient share")
    args = parser.parse_args()
    init_model_parallel(dist.get_world_size() if dist.is_initialized() else 2)
    tp, tp_group = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_group()
    if tp < 2:
        sys.exit("run under `torchrun --nproc_per_node 2`: TP=1 has no TP communication")

    rows, failures = [], 0
    for model_name, slot, out, inp, rank in CASES:
        for sp in (False, True):
            dense = measure(slot, out, inp, None, sp)[0].total_bytes(tp_group)
            low_rank, grads = (m.total_bytes(tp_group) for m in measure(slot, out, inp, rank, sp))
            expected = rank / (inp if slot in COLUMN_SLOTS else out)
            ratio = low_rank / dense
            ok = abs(ratio / expected - 1) <= 0.01
            failures += not ok
            # Per optimizer step: activations scale with tokens, the grad all-reduce does not.
            act_per_step = low_rank * args.tokens_per_step / (SEQ * BATCH)
            share = grads / (act_per_step + grads)
            rows.append((model_name, slot, f"{out}x{inp}", rank, "on" if sp else "off",
                         f"{dense / 2**20:.2f}", f"{low_rank / 2**20:.3f}", f"{ratio:.4f}",
                         f"{expected:.4f}", "ok" if ok else "FAIL",
                         f"{grads / 2**20:.3f}" if sp else "-", f"{share:.1%}" if sp else "-"))

    if dist.get_rank() == 0:
        header = ("model", "slot", "out x in", "r", "SP", "dense MB", "low-rank MB",
                  "ratio", "r/in|r/out", "1%", "grad MB/step", "grad share")
        print(f"TP={tp}, one forward+backward of {SEQ}x{BATCH} tokens, fp32; "
              f"grad share at {args.tokens_per_step} tokens per optimizer step")
        print(format_table(header, rows))
        print(f"{len(rows) - failures}/{len(rows)} activation ratios within 1% of r/in (column) "
              "or r/out (row)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
