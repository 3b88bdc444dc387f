"""Prefill and decode speed of factored HF exports of SmolLM2-135M vs the dense parent (CPU).

    .venv/bin/python bench/hf_inference.py [--keep 0.6 0.4 0.25] [--repeats 5] [--profile]
                                           [--parent HF_DIR] [--device cuda --dtype bf16 --batch 8]

Each family member is made the way users make one (megatron import, rank plan, decomposition,
``export_hf(format="factored")``) and loaded with ``trust_remote_code=True``. Timed
interleaved with the parent, fp32 on CPU (bf16 on a GPU), batch 1 (``--batch``): prefill of
512 tokens, and greedy decode of 64 tokens with the KV cache. The FLOP reduction is that of
each timed phase, counted as the HF code runs it: weight products (block matrices, and the LM
head for the positions whose logits are computed) plus attention scores and values over the
causal context, which no rank reduces. The target is speed-up >= 0.8 x FLOP reduction.
``--profile`` adds where decode time goes: torch's profiler splits one decode into matrix
products and everything else (norms, rotary, attention, the generation loop), and the
ceiling: the speed-up / FLOP reduction the member would reach if its matrix products sped up
by the full FLOP reduction and nothing else changed.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from timing import interleaved_medians, matmul_split  # bench/ is on sys.path when this runs as a script
from transformers import AutoModelForCausalLM

from nemo_plrd.assets import smollm2_135m
from nemo_plrd.cli import positive_int
from nemo_plrd.export import export_hf
from nemo_plrd.hf import import_hf
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.transform import apply_plan, plan_for

PREFILL, DECODE, SHORT = 512, 64, 16  # prefill tokens; decoded tokens after a SHORT prompt


def block_weights(model) -> int:
    """Weights of every matrix in the decoder blocks (norm weights are vectors)."""
    return sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)


def weights_per_token(model) -> int:
    """Weights a decoded token is multiplied by: every block matrix and the LM head."""
    return block_weights(model) + model.lm_head.weight.numel()


def forward_flops(model, tokens: int, cached: int, logits: int) -> int:
    """FLOPs of one forward of ``tokens`` new positions after ``cached`` ones, with ``logits`` LM-head rows.

    Per new position: 2 FLOPs per weight of every block matrix, and 4 x (heads x head_dim) per
    layer per position attended (QK^T and AV) over a causal context of cached + 1 ... cached + tokens.
    """
    config = model.config
    attended = tokens * cached + tokens * (tokens + 1) // 2
    # heads x head_dim is the hidden size (the import refuses a parent where it is not); a Qwen2 config has
    # no head_dim
    return (2 * block_weights(model) * tokens + 2 * model.lm_head.weight.numel() * logits
            + 4 * config.num_hidden_layers * config.hidden_size * attended)


def phase_flops(model) -> dict[str, int]:
    """FLOPs of each timed phase: prefill (logits at every position, as ``model(prompt)`` gives)
    and ``generate``'s decode (a prompt forward with last-position logits, then one position a step)."""
    decode = forward_flops(model, SHORT, 0, 1) + sum(
        forward_flops(model, 1, cached, 1) for cached in range(SHORT, SHORT + DECODE - 1))
    return {"prefill": forward_flops(model, PREFILL, 0, PREFILL), "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.4, 0.25])
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--profile", action="store_true", help="also split decode time: matmuls vs the rest")
    parser.add_argument("--parent", default=None, help="HF LLaMA directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--batch", type=positive_int, default=1)
    args = parser.parse_args()
    if args.profile and args.device == "cuda":
        parser.error("--profile splits CPU time (eager ops); run it with --device cpu")
    torch.set_grad_enabled(False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    parent_dir = args.parent or smollm2_135m()

    def load(path, **kwargs):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(args.device).eval()

    parent = load(parent_dir)
    prompt = torch.randint(0, parent.config.vocab_size, (args.batch, PREFILL),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    short = prompt[:, :SHORT]

    def prefill(model):
        return lambda: (model(prompt), synchronize())

    def decode(model):
        return lambda: (model.generate(short, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False),
                        synchronize())

    init_model_parallel(1)
    rows, splits = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for keep in args.keep:
            model, _ = import_hf(parent_dir)
            apply_plan(model, plan_for(model, keep=keep), method="svd", progress=False)
            out = export_hf(model, f"{tmp}/keep{keep}", parent_dir, format="factored")
            member = load(out, trust_remote_code=True)
            parent_flops, member_flops = phase_flops(parent), phase_flops(member)
            reduction = {phase: parent_flops[phase] / member_flops[phase] for phase in parent_flops}
            for phase, tokens, make in (("prefill", PREFILL, prefill), ("decode", DECODE, decode)):
                t = interleaved_medians({"dense": make(parent), "factored": make(member)}, args.repeats)
                speedup = t["dense"] / t["factored"]
                rows.append((f"{keep:.0%} of slots", phase, f"{member.num_parameters() / parent.num_parameters():.2f}",
                             f"{reduction[phase]:.2f}x", f"{args.batch * tokens / t['dense']:.0f}",
                             f"{args.batch * tokens / t['factored']:.0f}", f"{speedup:.2f}x",
                             f"{speedup / reduction[phase]:.2f}"))
                print(f"{keep:.0%} {phase}: {speedup:.2f}x faster, FLOP reduction {reduction[phase]:.2f}x",
                      flush=True)
            if args.profile:
                (dense_mm, dense_rest), (ours_mm, ours_rest) = matmul_split(decode(parent)), matmul_split(decode(member))
                matmul_reduction = weights_per_token(parent) / weights_per_token(member)
                ceiling = (dense_mm + dense_rest) / (dense_mm / matmul_reduction + ours_rest) / reduction["decode"]
                splits.append((f"{keep:.0%} of slots", f"{matmul_reduction:.2f}x", f"{dense_mm:.2f} / {ours_mm:.2f}",
                               f"{dense_mm / ours_mm:.2f}x", f"{dense_rest:.2f} / {ours_rest:.2f}",
                               f"{ours_rest / (ours_mm + ours_rest):.0%}", f"{ceiling:.2f}"))
    print(format_table(("member", "phase", "param ratio", "FLOP reduction", "dense tok/s", "factored tok/s",
                        "speed-up", "speed-up / FLOP red. (target >= 0.8)"), rows))
    if splits:
        print(f"\ndecode of {DECODE} tokens, profiled (seconds, dense / factored):")
        print(format_table(("member", "matmul FLOP red.", "matmuls", "matmul speed-up", "other ops",
                            "other share of factored", "ceiling: speed-up / FLOP red."), splits))


if __name__ == "__main__":
    main()
