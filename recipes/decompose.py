"""One PLRD decomposition stage: a parent -> one smaller family member, exported and evaluated.

    python recipes/decompose.py --config recipes/smollm2_135m.yaml [key=value ...]
    torchrun --nproc_per_node 3 recipes/decompose.py --config recipes/smollm2_135m.yaml   # TP = 3

The parent is an HF model directory (imported dense), a PLRD checkpoint (a member made
earlier: its factors are re-truncated, never multiplied out) or the embedded SmolLM2-135M.
It is calibrated on real text, decomposed to the planned ranks and written to OUTPUT:

    plan.json, plan.txt   every slot's rank (nemo_plrd.plan)
    checkpoint/           megatron dist_checkpointing, any TP size; the next stage's parent
    hf-factored/          the factors, loading with trust_remote_code=True
    hf-merged/            W = U V in the parent's stock HF class
    eval/                 lm-eval accuracies + perplexity of the first export (if eval.tasks)
    summary.md, .json     sizes, held-out perplexity before and after, the settings

Everything goes to OUTPUT.partial first and is renamed when complete. Continued pretraining
at the new rank is not part of this recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

from nemo_plrd.assets import shakespeare, smollm2_135m
from nemo_plrd.checkpoint import load_parent, save_checkpoint
from nemo_plrd.cli import run_script
from nemo_plrd.config import EMBEDDED_PARENT, EMBEDDED_TEXT, DecomposeConfig, load_config
from nemo_plrd.data import token_blocks
from nemo_plrd.evaluate import evaluate, heldout_blocks, markdown, write_results
from nemo_plrd.export import export_hf
from nemo_plrd.model import parameter_count
from nemo_plrd.plan import RankPlan
from nemo_plrd.parallel import init_distributed, init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.train import perplexity
from nemo_plrd.transform import apply_plan, plan_for

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. recipes/smollm2_135m.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="YAML-valued overrides, e.g. plrd.plan.keep=0.4 output=runs/smollm2-135m-40")
    args = parser.parse_args()
    cfg = load_config(DecomposeConfig, args.config, args.overrides)
    start = time.perf_counter()

    init_distributed()
    init_model_parallel(dist.get_world_size())  # TP = the number of processes
    rank0 = dist.get_rank() == 0
    model, arch, hf_source = load_parent(smollm2_135m() if cfg.parent == EMBEDDED_PARENT else cfg.parent)
    tokenizer = AutoTokenizer.from_pretrained(hf_source)
    calib = cfg.plrd.calibration
    text = shakespeare()["train"] if calib.text == EMBEDDED_TEXT else calib.text
    calibration = list(token_blocks(text, tokenizer, calib.seq_length, calib.tokens // calib.seq_length)
                       .split(calib.micro_batch))
    heldout = heldout_blocks(tokenizer, cfg.eval.perplexity_blocks)  # the blocks `evaluate` scores

    request = cfg.plrd.plan.request()
    plan = plan_for(model, calibration, cfg.plrd.method, **request)
    if rank0:
        print(plan.table(), flush=True)
    parent_params = parameter_count(model)
    parent_ppl = perplexity(model, heldout) if len(heldout) else None
    apply_plan(model, plan, calibration, cfg.plrd.method, progress=rank0, solver=cfg.plrd.solver,
               ridge=cfg.plrd.ridge)
    member_ppl = perplexity(model, heldout) if len(heldout) else None

    partial = Path(cfg.output + ".partial")
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted run's
        partial.mkdir(parents=True)
        plan.save(partial / "plan.json")
        (partial / "plan.txt").write_text(plan.table() + "\n")
    dist.barrier()
    save_checkpoint(model, partial / "checkpoint", arch, hf_source)
    exports = [export_hf(model, partial / f"hf-{format}", hf_source, format=format) for format in cfg.export]
    if not rank0:
        return  # the rest is rank 0's alone: lm-eval can outlast any collective's timeout

    figures = {"parent": cfg.parent, "parent_params": parent_params, "member_params": parameter_count(model),
               "parent_perplexity": parent_ppl, "member_perplexity": member_ppl, "heldout_tokens": heldout[:, 1:].numel(),
               "plan": request, "method": cfg.plrd.method, "calibration_tokens": calib.tokens,
               "tp": dist.get_world_size()}
    (partial / "summary.json").write_text(json.dumps(figures, indent=1) + "\n")
    summary = summarise(cfg, plan, figures)
    if cfg.eval.tasks:
        result = evaluate(exports[0], cfg.eval.tasks, cfg.eval.limit, cfg.eval.perplexity_blocks)
        write_results(result, partial / "eval")
        summary += ["", f"lm-eval on {exports[0].name} (limit {cfg.eval.limit}):", "", markdown(result)]
    summary += ["", f"{time.perf_counter() - start:.0f} s"]
    (partial / "summary.md").write_text("\n".join(summary) + "\n")
    partial.rename(cfg.output)
    print("\n".join(summary), f"\nwrote {cfg.output}", sep="\n")


def summarise(cfg: DecomposeConfig, plan: RankPlan, figures: dict) -> list[str]:
    """The summary's lines: parent vs member, then the settings."""
    rows = [("parameters", f"{figures['parent_params']:,}",
             f"{figures['member_params']:,} ({figures['member_params'] / figures['parent_params']:.1%})"),
            ("linear-layer parameters", f"{figures['parent_params'] - plan.other_params:,}", f"{plan.slot_params:,}")]
    if figures["parent_perplexity"] is not None:
        rows.append((f"held-out perplexity ({figures['heldout_tokens']} tokens)",
                     f"{figures['parent_perplexity']:.2f}", f"{figures['member_perplexity']:.2f}"))
    settings = (f"method {cfg.plrd.method} (solver {cfg.plrd.solver}, ridge {cfg.plrd.ridge:g}), plan "
                + ", ".join(f"{k}={v}" for k, v in figures["plan"].items())
                + f", calibration {figures['calibration_tokens']:,} tokens of {cfg.plrd.calibration.text}, "
                f"TP={figures['tp']}")
    return [f"# {Path(cfg.output).name}", "", f"parent: {cfg.parent}", "",
            format_table(("", "parent", "member"), rows), "", settings]


if __name__ == "__main__":
    run_script(main)
