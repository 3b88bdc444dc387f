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

With ``train.steps`` > 0 the member continues pretraining at its new rank (megatron DDP and
gradient finalisation, AdamW; ``nemo_plrd.train``) before it is saved, exported and evaluated.
Everything goes to OUTPUT.partial first and is renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch.distributed as dist
from transformers import AutoTokenizer

from nemo_plrd.assets import shakespeare, smollm2_135m
from nemo_plrd.checkpoint import load_parent, save_checkpoint
from nemo_plrd.cli import recipe_config, run_script
from nemo_plrd.config import EMBEDDED_PARENT, EMBEDDED_TEXT, DecomposeConfig
from nemo_plrd.data import token_blocks
from nemo_plrd.evaluate import evaluate, heldout_blocks, markdown, write_results
from nemo_plrd.export import export_hf
from nemo_plrd.model import parameter_count
from nemo_plrd.parallel import init_distributed, init_model_parallel
from nemo_plrd.report import format_table
from nemo_plrd.train import continue_pretraining, perplexity
from nemo_plrd.transform import apply_plan, plan_for


def main() -> None:
    cfg = recipe_config(DecomposeConfig, __doc__, "recipes/smollm2_135m.yaml",
                        "plrd.plan.keep=0.4 output=runs/smollm2-135m-40")
    init_distributed()
    init_model_parallel(dist.get_world_size())  # TP = the number of processes
    if run_stage(cfg) is not None:
        print((Path(cfg.output) / "summary.md").read_text(), f"wrote {cfg.output}", sep="\n")


def run_stage(cfg: DecomposeConfig, evaluate_now: bool = True) -> dict | None:
    """The stage, with megatron's model parallelism initialised; on rank 0, its figures (summary.json)."""
    start = time.perf_counter()
    rank0 = dist.get_rank() == 0
    model, arch, hf_source = load_parent(smollm2_135m() if cfg.parent == EMBEDDED_PARENT else cfg.parent)
    tokenizer = AutoTokenizer.from_pretrained(hf_source)
    calib = cfg.plrd.calibration
    calibration = list(token_blocks(text_path(calib.text), tokenizer, calib.seq_length,
                                    calib.tokens // calib.seq_length).split(calib.micro_batch))
    heldout = heldout_blocks(tokenizer, cfg.eval.perplexity_blocks)  # the blocks `evaluate` scores

    def heldout_perplexity() -> float | None:
        return perplexity(model, heldout) if len(heldout) else None

    request = cfg.plrd.plan.request()
    plan = plan_for(model, calibration, cfg.plrd.method, **request)
    if rank0:
        print(plan.table(), flush=True)
    parent_params = parameter_count(model)
    parent_ppl = heldout_perplexity()
    apply_plan(model, plan, calibration, cfg.plrd.method, progress=rank0, solver=cfg.plrd.solver,
               ridge=cfg.plrd.ridge)
    decomposed_ppl = heldout_perplexity()
    losses = []
    if cfg.train.steps:
        train = cfg.train
        blocks = token_blocks(text_path(train.text), tokenizer, train.seq_length + 1, train.steps * train.micro_batch)
        losses = continue_pretraining(model, blocks, train.micro_batch, train.lr, train.warmup_steps, progress=rank0)
    member_ppl = heldout_perplexity() if losses else decomposed_ppl

    partial = Path(cfg.output + ".partial")
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted run's
        partial.mkdir(parents=True)
        plan.save(partial / "plan.json")
        (partial / "plan.txt").write_text(plan.table() + "\n")
    dist.barrier()
    save_checkpoint(model, partial / "checkpoint", arch, hf_source)
    for format in cfg.export:
        export_hf(model, partial / f"hf-{format}", hf_source, format=format)
    if not rank0:
        return None  # the rest is rank 0's alone: lm-eval can outlast any collective's timeout

    figures = {"parent": cfg.parent, "parent_params": parent_params, "member_params": parameter_count(model),
               "parent_linear_params": parent_params - plan.other_params, "member_linear_params": plan.slot_params,
               "parent_perplexity": parent_ppl, "decomposed_perplexity": decomposed_ppl,
               "member_perplexity": member_ppl, "heldout_tokens": heldout[:, 1:].numel(), "plan": request,
               "method": cfg.plrd.method, "calibration_tokens": calib.tokens, "train_tokens": cfg.train.tokens,
               "train_losses": losses, "tp": dist.get_world_size(), "seconds": time.perf_counter() - start}
    finish(cfg, partial, figures, evaluate_now)
    partial.rename(cfg.output)
    return figures


def finish(cfg: DecomposeConfig, folder: Path, figures: dict, evaluate_now: bool = True) -> None:
    """lm-eval on the first export (if ``evaluate_now`` and eval.tasks), then summary.json and summary.md.

    The family recipe evaluates its members at the end, so that no rank waits on another's lm-eval.
    """
    if evaluate_now and cfg.eval.tasks:
        start = time.perf_counter()
        result = evaluate(folder / f"hf-{cfg.export[0]}", cfg.eval.tasks, cfg.eval.limit, cfg.eval.perplexity_blocks)
        write_results(result, folder / "eval")
        figures |= {"eval": result, "eval_seconds": time.perf_counter() - start}
    (folder / "summary.json").write_text(json.dumps(figures, indent=1) + "\n")
    (folder / "summary.md").write_text("\n".join(summarise(cfg, figures)) + "\n")


def text_path(text: str) -> Path:
    """A config's ``text``: a file, or the embedded training plays."""
    return shakespeare()["train"] if text == EMBEDDED_TEXT else Path(text)


def summarise(cfg: DecomposeConfig, figures: dict) -> list[str]:
    """The summary's lines: parent vs member, the settings, lm-eval's table if it ran."""
    rows = [("parameters", f"{figures['parent_params']:,}",
             f"{figures['member_params']:,} ({figures['member_params'] / figures['parent_params']:.1%})"),
            ("linear-layer parameters", f"{figures['parent_linear_params']:,}", f"{figures['member_linear_params']:,}")]
    if figures["parent_perplexity"] is not None:
        rows.append((f"held-out perplexity ({figures['heldout_tokens']} tokens)",
                     f"{figures['parent_perplexity']:.2f}", f"{figures['decomposed_perplexity']:.2f}"))
        if figures["train_losses"]:
            rows.append((f"  after training on {figures['train_tokens']:,} tokens", "",
                         f"{figures['member_perplexity']:.2f}"))
    settings = (f"method {cfg.plrd.method} (solver {cfg.plrd.solver}, ridge {cfg.plrd.ridge:g}), plan "
                + ", ".join(f"{k}={v}" for k, v in figures["plan"].items())
                + f", calibration {figures['calibration_tokens']:,} tokens of {cfg.plrd.calibration.text}, "
                f"TP={figures['tp']}")
    if figures["train_losses"]:
        train = cfg.train
        settings += (f"; trained {train.steps} steps of {train.micro_batch}x{train.seq_length} tokens of {train.text}, "
                     f"lr {train.lr:g} (warm-up {train.warmup_steps}, cosine to {train.lr / 10:g}), "
                     f"loss {figures['train_losses'][0]:.3f} -> {figures['train_losses'][-1]:.3f}")
    lines = [f"# {Path(cfg.output).name}", "", f"parent: {figures['parent']}", "",
             format_table(("", "parent", "member"), rows), "", settings, "", f"{figures['seconds']:.0f} s"]
    if "eval" in figures:
        lines += ["", f"lm-eval on hf-{cfg.export[0]} (limit {cfg.eval.limit}, {figures['eval_seconds']:.0f} s):", "",
                  markdown(figures["eval"])]
    return lines


if __name__ == "__main__":
    run_script(main)
