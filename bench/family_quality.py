"""The family at a bigger budget than the main job: LM loss vs distillation, progressive vs one-shot.

    OMP_NUM_THREADS=2 .venv/bin/python bench/family_quality.py [--scale 4] [--limit 200] [--output runs/quality]

Runs the main job's recipe (recipes/smollm2_135m_family.yaml: same data, same seed) three times
with ``scale`` times its training steps per stage: once with the LM loss and both baselines, then
with the LM loss plus logit distillation from the parent (``stage.train.loss=lm+kd``, the
recipe's default) and with distillation alone (``kd``), each with its one-shot member. All are
measured against the one control, the parent trained with the LM loss. Every model is
evaluated on ``limit`` items per lm-eval task (the whole split where it is smaller), so the
standard errors are small enough to tell members apart. One table: per model and loss the
in-domain held-out perplexity, its ratio to the control's, the share of the decomposition's
gap to the control that training closed, the unseen genre's perplexity and the mean accuracy.
Each family is a recipes/family.py output: an interrupted run resumes, a finished one is read back.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from nemo_plrd.report import format_table, gap_closed, in_domain

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_135m_family.yaml"
LOSSES = ("lm", "lm+kd", "kd")


def run_family(loss: str, scale: int, limit: int, output: Path) -> dict:
    """The family trained with ``loss`` (recipes/family.py); its family.json."""
    steps, warmup, interval = 24 * scale, 4 * scale, 12 * scale  # the recipe's 24, 4 and 12, scaled
    baselines = "[control, one-shot]" if loss == "lm" else "[one-shot]"
    subprocess.run([sys.executable, str(ROOT / "recipes" / "family.py"), "--config", str(RECIPE),
                    f"baselines={baselines}", f"stage.train.loss={loss}", f"stage.train.steps={steps}",
                    f"stage.train.warmup_steps={warmup}", f"stage.train.save_interval={interval}",
                    f"stage.train.eval_interval={interval}", f"stage.eval.limit={limit}", f"output={output}"],
                   check=True)
    return json.loads((output / "family.json").read_text())


def mean_accuracy(figures: dict) -> str:
    tasks = figures["eval"]["tasks"] if "eval" in figures else {}
    return f"{sum(t['acc'] for t in tasks.values()) / len(tasks):.3f}" if tasks else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=4, help="training steps per stage, x the main job's 24")
    parser.add_argument("--limit", type=int, default=200, help="lm-eval items per task")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "quality")
    args = parser.parse_args()
    families = {loss: run_family(loss, args.scale, args.limit, args.output / f"x{args.scale}-{loss}") for loss in LOSSES}

    header = ["model", "params"]
    for loss in LOSSES:
        header += [f"{loss}: in-domain ppl", "/ control", "gap closed", "news (unseen)", "mean acc"]
    first = families["lm"]
    control = first["baselines"]["control"]
    keep = [f"stage {i} (keep {k:g})" for i, k in enumerate(first["keep"], 1)]
    names = ["control", *keep, f"one-shot (keep {first['keep'][-1]:g})"]
    rows = []
    for index, name in enumerate(names):
        row = None
        for loss in LOSSES:
            family = families[loss]
            figures = ([control] + family["members"] + [family["baselines"]["one-shot"]])[index]
            ppl = in_domain(figures, "member_perplexity")
            row = row or [name, f"{figures['member_params'] / 1e6:.1f}M"]
            row += [f"{ppl:.2f}", f"{ppl / in_domain(control, 'member_perplexity'):.2f}x",
                    gap_closed(figures, control) if index else "",
                    f"{figures['member_perplexity']['news']:.2f}", mean_accuracy(figures)]
        rows.append(row)
    parent = first["members"][0]
    print(f"\nfamily of SmolLM2-135M, {24 * args.scale} steps of 4 x 256 tokens per stage "
          f"({args.scale}x the main job); parent: in-domain ppl {in_domain(parent, 'parent_perplexity'):.2f}, "
          f"news {parent['parent_perplexity']['news']:.2f}; lm-eval limit {args.limit} items per task\n")
    print(format_table(header, rows))


if __name__ == "__main__":
    main()
