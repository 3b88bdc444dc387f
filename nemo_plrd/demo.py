"""The foundation demo: dense vs low-rank SmolLM2-135M under tensor parallelism.

Builds the SmolLM2-135M architecture (random weights: the figures it reports do not depend
on them) dense and with every slot at half its break-even rank, trains each a few
steps on synthetic tokens at TP=3 (SmolLM2 has 3 KV heads), and reports parameters,
TP communication per step and training throughput side by side.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from tqdm import tqdm

from nemo_plrd.comm import CollectiveMeter
from nemo_plrd.data import DataParallelBatches, token_samples
from nemo_plrd.model import SMOLLM2_135M, LlamaArch, build_gpt, parameter_count
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.slots import break_even_rank
from nemo_plrd.train import Schedule, Trainer


def half_break_even_ranks(arch: LlamaArch, multiple: int = 8) -> dict[str, int]:
    return {
        slot: max(multiple, int(break_even_rank(out, inp) / 2) // multiple * multiple)
        for slot, (out, inp) in arch.slot_shapes().items()
    }


def run_demo(tensor_parallel_size: int, steps: int, seq_length: int, micro_batch: int) -> None:
    init_model_parallel(tensor_parallel_size)
    arch = SMOLLM2_135M
    ranks = half_break_even_ranks(arch)
    tokens = torch.randint(0, arch.vocab_size, (micro_batch, seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"SmolLM2-135M architecture, TP={tensor_parallel_size}, fp32 on "
              f"{'GPU' if torch.cuda.is_available() else 'CPU'}; low-rank slot ranks {ranks}")

    results = {}  # name -> (params, TP bytes per step, tokens/s, last loss)
    for name, slot_ranks in (("dense", None), ("low-rank", ranks)):
        model = build_gpt(arch, slot_ranks)
        params = parameter_count(model)
        # The same micro-batch at every step: a fixed workload to time and meter.
        batches = DataParallelBatches(token_samples(tokens.repeat(steps, 1)), micro_batch, micro_batch, 0, 1)
        schedule = Schedule(steps, micro_batch, decay_style="constant")
        trainer = Trainer(model, OptimizerConfig(lr=1e-4, min_lr=0.0), schedule, batches)
        meter = CollectiveMeter()
        progress = tqdm(range(steps), desc=f"{name:>8}", unit="step", disable=not rank0)
        warmup = 1 if steps > 1 else 0  # the first step (Adam's state, the first collectives) is not timed
        with meter.measure():
            for step in progress:
                if step == warmup:
                    start = time.perf_counter()
                loss = trainer.step()["loss"]
                if step >= warmup:
                    tokens_per_s = (step + 1 - warmup) * tokens[:, 1:].numel() / (time.perf_counter() - start)
                    progress.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{tokens_per_s:.0f}")
        results[name] = (params, meter.total_bytes(tp_group) / steps, tokens_per_s, loss)
        del model, trainer

    if rank0:
        dense = results["dense"]
        rows = [
            (name, f"{params / 1e6:.1f}M", f"{comm / 2**20:.1f}", f"{speed:.0f}", f"{loss:.3f}",
             f"{params / dense[0]:.2f} / {comm / dense[1]:.2f} / {speed / dense[2]:.2f}")
            for name, (params, comm, speed, loss) in results.items()
        ]
        print(format_table(("model", "params", "TP MB/step", "tokens/s", "last loss",
                            "params / comm / speed vs dense"), rows))
