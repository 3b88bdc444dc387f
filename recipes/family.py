"""The PLRD family: from one parent, stage after stage of decomposition and continued pretraining.

    python recipes/family.py --config recipes/smollm2_135m_family.yaml [key=value ...]
    torchrun --nproc_per_node 3 recipes/family.py --config recipes/smollm2_135m_family.yaml   # TP = 3

Stage 1 decomposes the parent to ``keep[0]`` of its dense linear-layer parameters and trains
at that rank; stage k re-truncates stage k-1's checkpoint to ``keep[k-1]`` (the factors are
never multiplied out) and trains again. Each stage is ``recipes/decompose.py``'s, with the
settings under ``stage:``. When all stages are trained, rank 0 evaluates every member with
lm-eval (so no rank waits on another's evaluation). OUTPUT holds:

    stage1-keep0.6/ ...     each stage as recipes/decompose.py writes it (checkpoint, exports, eval)
    family.md, family.json  one row per member: parameters, held-out perplexity after the
                            decomposition and after training, lm-eval accuracies
    family.png              held-out perplexity against parameters, before and after training

Everything goes to OUTPUT.partial first and is renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import matplotlib
import torch.distributed as dist
from decompose import finish, run_stage  # recipes/ is on sys.path when this runs as a script

from nemo_plrd.assets import smollm2_135m
from nemo_plrd.cli import recipe_config, run_script
from nemo_plrd.config import EMBEDDED_PARENT, DecomposeConfig, FamilyConfig
from nemo_plrd.evaluate import evaluate
from nemo_plrd.parallel import init_distributed, init_model_parallel
from nemo_plrd.report import format_table

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402


def main() -> None:
    cfg = recipe_config(FamilyConfig, __doc__, "recipes/smollm2_135m_family.yaml",
                        "'keep=[0.5, 0.3]' stage.train.steps=100")
    start = time.perf_counter()
    init_distributed()
    init_model_parallel(dist.get_world_size())  # TP = the number of processes
    rank0 = dist.get_rank() == 0
    partial = Path(cfg.output + ".partial")
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted run's
        partial.mkdir(parents=True)
    dist.barrier()

    parent, stages = cfg.parent, []
    for index, keep in enumerate(cfg.keep):
        stage = cfg.stage_config(index, parent, str(partial))
        if rank0:
            print(f"\n=== stage {index + 1} of {len(cfg.keep)}: keep {keep:g} of the dense linear-layer parameters, "
                  f"from {parent}", flush=True)
        run_stage(stage, evaluate_now=False)
        dist.barrier()  # rank 0 renames the stage's folder: its checkpoint is the next parent
        stages.append(stage)
        parent = str(Path(stage.output) / "checkpoint")
    if not rank0:
        return

    members = []
    for stage in stages:
        folder = Path(stage.output)
        figures = json.loads((folder / "summary.json").read_text())
        figures["parent"] = figures["parent"].replace(str(partial), cfg.output)  # where it will be after the rename
        finish(stage, folder, figures)
        members.append(figures)
    parent_eval = evaluate_parent(cfg.parent, stages[0])
    report = family_report(cfg, parent_eval, members)
    (partial / "family.json").write_text(json.dumps({"keep": cfg.keep, "parent_eval": parent_eval, "members": members},
                                                    indent=1) + "\n")
    (partial / "family.md").write_text("\n".join(report) + f"\n\n{time.perf_counter() - start:.0f} s\n")
    plot(cfg, members, partial / "family.png")
    partial.rename(cfg.output)
    print("\n".join(report), f"\nwrote {cfg.output} (family.md, family.png, one folder per stage)", sep="\n")


def evaluate_parent(parent: str, stage: DecomposeConfig) -> dict | None:
    """lm-eval on the parent with the stages' settings, for the report's first row (an HF parent only:
    a PLRD checkpoint parent was evaluated as the member it is)."""
    folder = smollm2_135m() if parent == EMBEDDED_PARENT else Path(parent)
    if not stage.eval.tasks or (folder / "metadata.json").is_file():
        return None
    return evaluate(folder, stage.eval.tasks, stage.eval.limit, stage.eval.perplexity_blocks)


def family_report(cfg: FamilyConfig, parent_eval: dict | None, members: list[dict]) -> list[str]:
    """One table row for the parent and one per member; accuracies where lm-eval ran."""
    tasks = list(members[0]["eval"]["tasks"]) if "eval" in members[0] else []

    def accuracies(result: dict | None) -> list[str]:
        return [f"{result['tasks'][task]['acc']:.3f}" if result else "" for task in tasks]

    parent = members[0]
    header = ["model", "keep", "parameters", "held-out ppl (decomposed)", "held-out ppl (trained)", *tasks]
    rows = [["parent", "", f"{parent['parent_params'] / 1e6:.1f}M", "", fmt(parent["parent_perplexity"]),
             *accuracies(parent_eval)]]
    for keep, member in zip(cfg.keep, members):
        rows.append([f"stage {len(rows)}", f"{keep:g}", f"{member['member_params'] / 1e6:.1f}M",
                     fmt(member["decomposed_perplexity"]), fmt(member["member_perplexity"]) if member["train_losses"]
                     else "(not trained)", *accuracies(member.get("eval"))])
    train = members[0]["train_tokens"]
    return [f"# PLRD family of {cfg.parent}", "", format_table(header, rows), "",
            f"Held-out perplexity on {parent['heldout_tokens']:,} tokens; "
            + (f"each stage trained on {train:,} tokens" if train else "no training between stages")
            + (f"; lm-eval accuracy (acc), limit {parent['eval']['limit']} items per task" if tasks else "")
            + "."]


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(cfg: FamilyConfig, members: list[dict], path: Path) -> None:
    """Held-out perplexity against parameters: the parent, each member as decomposed, then as trained."""
    if members[0]["parent_perplexity"] is None:
        return  # eval.perplexity_blocks=0: nothing to plot
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    params = [members[0]["parent_params"] / 1e6] + [m["member_params"] / 1e6 for m in members]
    trained = [members[0]["parent_perplexity"]] + [m["member_perplexity"] for m in members]
    axes.plot(params, trained, "o-", label="parent, then each member after training")
    for keep, member, x in zip(cfg.keep, members, params[1:]):
        axes.annotate(f"keep {keep:g}", (x, member["member_perplexity"]), textcoords="offset points",
                      xytext=(4, 6), fontsize=8)
        axes.plot([x, x], [member["decomposed_perplexity"], member["member_perplexity"]], ":", color="gray")
    axes.plot(params[1:], [m["decomposed_perplexity"] for m in members], "x", color="tab:red",
              label="each member right after its decomposition")
    axes.set(xlabel="parameters (millions)", ylabel="held-out perplexity", yscale="log",
             title=f"PLRD family of {Path(cfg.parent).name}")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(plain)
    axes.yaxis.set_minor_formatter(plain)
    axes.tick_params(axis="y", which="minor", labelsize=7)
    axes.invert_xaxis()  # the family grows smaller to the right
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    run_script(main)
