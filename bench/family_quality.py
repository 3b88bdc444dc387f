"""The family at a bigger budget than the main job: LM loss vs distillation, progressive vs one-shot.

    OMP_NUM_THREADS=2 .venv/bin/python bench/family_quality.py [--scale 4] [--batch 4] [--limit 200]
        [--losses lm lm+kd kd] [--concurrent] [--output runs/quality] [override ...]

Runs the main job's recipe (recipes/smollm2_135m_family.yaml: same data, same seed) once per loss
with ``scale`` times its training steps per stage and ``batch`` sequences of 256 tokens per step
(the recipe's 4, sized for 2 CPU cores; a GPU takes many more per step): with the LM loss and both
baselines, then with the LM loss plus logit distillation from the parent (``lm+kd``, the
recipe's default) and with distillation alone (``kd``), each with its one-shot member. All are
measured against the one control, the parent trained with the LM loss. Trailing overrides go to
every family (e.g. ``stage.eval.batch_size=64`` on a GPU); ``--concurrent`` runs the families side
by side (one GPU holds them all). Every model is
evaluated on ``limit`` items per lm-eval task (the whole split where it is smaller), so the
standard errors are small enough to tell members apart. One table: per model and loss the
in-domain held-out perplexity, its ratio to the control's, the share of the decomposition's
gap to the control that training closed, the unseen genre's perplexity and the mean accuracy with its
standard error.
Each family is a recipes/family.py output: an interrupted run resumes, a finished one is read back.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from nemo_plrd.cli import positive_int
from nemo_plrd.evaluate import with_stderr
from nemo_plrd.report import format_table, gap_closed, headline_perplexity

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_135m_family.yaml"
LOSSES = ("lm", "lm+kd", "kd")


def family_command(loss: str, scale: int, batch: int, limit: int, output: Path, overrides: list[str]) -> list[str]:
    """recipes/family.py training the family with ``loss``."""
    steps, warmup, interval = 24 * scale, 4 * scale, 12 * scale  # the recipe's 24, 4 and 12, scaled
    baselines = "[control, one-shot]" if loss == "lm" else "[one-shot]"
    return [sys.executable, str(ROOT / "recipes" / "family.py"), "--config", str(RECIPE),
            f"baselines={baselines}", f"stage.train.loss={loss}", f"stage.train.steps={steps}",
            f"stage.train.micro_batch={batch}", f"stage.train.global_batch={batch}",
            f"stage.train.warmup_steps={warmup}", f"stage.train.save_interval={interval}",
            f"stage.train.eval_interval={interval}", f"stage.eval.limit={limit}", f"output={output}", *overrides]


def run_families(commands: list[list[str]], concurrent: bool) -> None:
    """One after another, or all at once (a GPU that one small model leaves idle between kernels holds
    several families: their Python, checkpoint and evaluation time overlap)."""
    if not concurrent:
        for command in commands:
            subprocess.run(command, check=True)
        return
    processes = [subprocess.Popen(command) for command in commands]
    failed = [command for command, process in zip(commands, processes) if process.wait()]
    if failed:
        raise SystemExit(f"{len(failed)} famil{'y' if len(failed) == 1 else 'ies'} failed: {failed}")


def mean_accuracy(figures: dict) -> str:
    """The tasks' mean accuracy ± its standard error (their items drawn independently: the errors add in
    quadrature)."""
    tasks = list(figures["eval"]["tasks"].values()) if "eval" in figures else []
    if not tasks:
        return ""
    mean = {"acc": sum(task["acc"] for task in tasks) / len(tasks)}
    errors = [task.get("acc_stderr") for task in tasks]
    if all(isinstance(error, (int, float)) and error == error for error in errors):  # NaN: lm-eval had none
        mean["acc_stderr"] = math.sqrt(sum(error**2 for error in errors)) / len(tasks)
    return with_stderr(mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=positive_int, default=4, help="training steps per stage, x the main job's 24")
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences of 256 tokens per step (the recipe's 4)")
    parser.add_argument("--limit", type=positive_int, default=200, help="lm-eval items per task")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                        help="the families to train; lm is always one (it trains the control)")
    parser.add_argument("--concurrent", action="store_true", help="run the families side by side (on a GPU)")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="for every family, e.g. stage.eval.tasks=[piqa]")
    args = parser.parse_args()
    losses = ["lm", *(loss for loss in LOSSES if loss in args.losses and loss != "lm")]
    outputs = {loss: args.output / f"steps{args.scale}x-batch{args.batch}-{loss}" for loss in losses}
    run_families([family_command(loss, args.scale, args.batch, args.limit, output, args.overrides)
                  for loss, output in outputs.items()], args.concurrent)
    families = {loss: json.loads((output / "family.json").read_text()) for loss, output in outputs.items()}

    first = families["lm"]
    control = first["baselines"]["control"]
    parent = first["members"][0]
    unseen = [name for name in parent["parent_perplexity"] if name not in parent["in_domain"]]
    header = ["model", "params"]
    for loss in losses:
        header += [f"{loss}: in-domain ppl", "/ control", "gap closed", *(f"{name} (unseen)" for name in unseen),
                   "mean acc ± se"]
    keep = [f"stage {i} (keep {k:g})" for i, k in enumerate(first["keep"], 1)]
    names = ["control", *keep, f"one-shot (keep {first['keep'][-1]:g})"]
    rows = []
    for index, name in enumerate(names):
        row = None
        for loss in losses:
            family = families[loss]
            figures = ([control] + family["members"] + [family["baselines"]["one-shot"]])[index]
            ppl = headline_perplexity(figures, "member_perplexity")
            row = row or [name, f"{figures['member_params'] / 1e6:.1f}M"]
            row += [f"{ppl:.2f}", f"{ppl / headline_perplexity(control, 'member_perplexity'):.2f}x",
                    gap_closed(figures, control) if index else "",
                    *(f"{figures['member_perplexity'][name]:.2f}" for name in unseen), mean_accuracy(figures)]
        rows.append(row)
    text = (f"family of SmolLM2-135M, {24 * args.scale} steps of {args.batch} x 256 tokens per stage "
            f"({args.scale * args.batch / 4:g}x the main job's tokens); parent: in-domain ppl "
            f"{headline_perplexity(parent, 'parent_perplexity'):.2f}"
            + "".join(f", {name} {parent['parent_perplexity'][name]:.2f}" for name in unseen)
            + f"; lm-eval limit {args.limit} items per task\n\n{format_table(header, rows)}\n")
    (args.output / "quality.md").write_text(text)
    print(f"\n{text}\nwrote {args.output / 'quality.md'}")


if __name__ == "__main__":
    main()
