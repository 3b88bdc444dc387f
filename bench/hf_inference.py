"""Prefill and decode speed of factored HF exports of SmolLM2-135M vs the dense parent (CPU).

    .venv/bin/python bench/hf_inference.py [--keep 0.6 0.4 0.25] [--repeats 5]

Each family member is made the way users make one (megatron import, rank plan, decomposition,
``export_hf(format="factored")``) and loaded with ``trust_remote_code=True``. Timed
interleaved with the parent, fp32, batch 1: prefill of 512 tokens, and greedy decode of 64
tokens with the KV cache. The FLOP reduction counts the matmuls per token (slots + LM head);
the target is speed-up >= 0.8 x FLOP reduction.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from timing import interleaved_medians  # bench/ is on sys.path when this runs as a script
from transformers import AutoModelForCausalLM

from nemo_plrd.assets import smollm2_135m
from nemo_plrd.export import export_hf
from nemo_plrd.hf import import_hf
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.transform import apply_plan, plan_for

PREFILL, DECODE = 512, 64


def matmul_params(model) -> int:
    """Weights multiplied per token: every 2-D weight but the (input) embedding table."""
    return sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name) + (
        model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.6, 0.4, 0.25])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    parent_dir = smollm2_135m()
    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    prompt = torch.randint(0, parent.config.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    short = prompt[:, :16]

    def prefill(model):
        return lambda: model(prompt)

    def decode(model):
        return lambda: model.generate(short, max_new_tokens=DECODE, min_new_tokens=DECODE, do_sample=False)

    init_model_parallel(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for keep in args.keep:
            model, _ = import_hf(parent_dir)
            apply_plan(model, plan_for(model, keep=keep), method="svd", progress=False)
            out = export_hf(model, f"{tmp}/keep{keep}", parent_dir, format="factored")
            member = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
            flops = matmul_params(parent) / matmul_params(member)
            for phase, tokens, make in (("prefill", PREFILL, prefill), ("decode", DECODE, decode)):
                t = interleaved_medians({"dense": make(parent), "factored": make(member)}, args.repeats)
                speedup = t["dense"] / t["factored"]
                rows.append((f"{keep:.0%} of slots", phase, f"{member.num_parameters() / parent.num_parameters():.2f}",
                             f"{flops:.2f}x", f"{tokens / t['dense']:.0f}", f"{tokens / t['factored']:.0f}",
                             f"{speedup:.2f}x", f"{speedup / flops:.2f}"))
                print(f"{keep:.0%} {phase}: {speedup:.2f}x faster, FLOP reduction {flops:.2f}x", flush=True)
    print(format_table(("member", "phase", "param ratio", "FLOP reduction", "dense tok/s", "factored tok/s",
                        "speed-up", "speed-up / FLOP red. (target >= 0.8)"), rows))


if __name__ == "__main__":
    main()
