"""How the ridge of the column slots (``nemo_plrd.transform.RIDGE``) was chosen: on validation text.

SmolLM2-135M at one fraction of its linear-layer parameters, the default method, calibrated
on 8,192 tokens (train plays, blocks 0-15 of 512). Validation perplexity (train plays, blocks
100-115: never calibrated on) picks the ridge; the held-out plays are printed beside it for
the record, not used for choosing.

    .venv/bin/python bench/ridge_sweep.py [--ridges 1e-6 1e-3 1e-2 3e-2] [--keep 0.6]
"""

from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from nemo_plrd.assets import corpus, smollm2_135m
from nemo_plrd.data import token_blocks
from nemo_plrd.hf import import_hf
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.train import perplexity
from nemo_plrd.transform import RIDGE, apply_plan, plan_for

SEQ, BLOCKS, VALIDATION_START = 512, 16, 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ridges", type=float, nargs="+", default=[1e-6, 1e-3, 1e-2, 3e-2])
    parser.add_argument("--keep", type=float, default=0.6)
    args = parser.parse_args()

    init_model_parallel(1)
    parent, text = smollm2_135m(), corpus("shakespeare")
    tokenizer = AutoTokenizer.from_pretrained(parent)
    calibration = list(token_blocks(text["train"], tokenizer, SEQ, BLOCKS).split(4))
    validation = token_blocks(text["train"], tokenizer, SEQ + 1, BLOCKS, start_block=VALIDATION_START)
    heldout = token_blocks(text["heldout"], tokenizer, SEQ + 1, BLOCKS)
    rows = []
    for ridge in args.ridges:
        model, _ = import_hf(parent)
        apply_plan(model.eval(), plan_for(model, keep=args.keep), calibration, ridge=ridge, progress=False)
        rows.append((ridge, perplexity(model, validation), perplexity(model, heldout)))
        print(f"ridge {ridge:g}: validation {rows[-1][1]:.2f}, held-out {rows[-1][2]:.2f}", flush=True)
    best = min(rows, key=lambda row: row[1])[0]
    print(format_table(("ridge", "validation ppl", "held-out ppl"),
                       [(f"{r:g}", f"{v:.2f}", f"{h:.2f}") for r, v, h in rows]))
    print(f"lowest validation perplexity: ridge {best:g} (nemo_plrd.transform.RIDGE = {RIDGE:g})")


if __name__ == "__main__":
    main()
