"""What people read at the end of a run: plain-text tables, a stage's summary, a family's report and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence


def format_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Right-aligned columns separated by two spaces, header first."""
    rows = [tuple(map(str, row)) for row in rows]
    header = tuple(map(str, header))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (header, *rows))


def fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def stage_summary(cfg, figures: dict) -> list[str]:
    """A stage's summary.md: parent vs member, the settings, lm-eval's table if it ran."""
    from nemo_plrd.evaluate import markdown

    rows = [("parameters", f"{figures['parent_params']:,}",
             f"{figures['member_params']:,} ({figures['member_params'] / figures['parent_params']:.1%})"),
            ("linear-layer parameters", f"{figures['parent_linear_params']:,}", f"{figures['member_linear_params']:,}")]
    if figures["parent_perplexity"] is not None:
        rows.append((f"held-out perplexity ({figures['heldout_tokens']} tokens)",
                     f"{figures['parent_perplexity']:.2f}", f"{figures['decomposed_perplexity']:.2f}"))
        if figures["train_losses"]:
            rows.append((f"  after training on {figures['train_tokens']:,} tokens", "",
                         f"{figures['member_perplexity']:.2f}"))
    prefixes, weights = cfg.dataset.blend
    data = ", ".join(prefixes) if weights is None else ", ".join(f"{w:g} x {p}" for p, w in zip(prefixes, weights))
    settings = (f"method {cfg.plrd.method} (solver {cfg.plrd.solver}, ridge {cfg.plrd.ridge:g}), plan "
                + ", ".join(f"{k}={v}" for k, v in figures["plan"].items())
                + f", calibration {figures['calibration_tokens']:,} tokens of {data}, "
                f"TP={figures['tp']} x DP={figures['dp']}")
    if figures["train_losses"]:
        train, optimizer = cfg.train, cfg.optimizer_config()
        settings += (f"; trained {train.steps} steps of {train.global_batch}x{train.seq_length} tokens, "
                     f"{optimizer.optimizer} lr {optimizer.lr:g} (warm-up {train.warmup_steps}, {train.decay_style} "
                     f"to {optimizer.min_lr:g}), loss {figures['train_losses'][0]:.3f} -> "
                     f"{figures['train_losses'][-1]:.3f}")
        if figures["valid_losses"]:
            settings += ", validation loss " + " -> ".join(f"{loss:.3f} (step {step})"
                                                          for step, loss in figures["valid_losses"])
    lines = [f"# {Path(cfg.output).name}", "", f"parent: {figures['parent']}", "",
             format_table(("", "parent", "member"), rows), "", settings, "", f"{figures['seconds']:.0f} s"]
    if "eval" in figures:
        lines += ["", f"lm-eval on hf-{cfg.export[0]} (limit {cfg.eval.limit}, {figures['eval_seconds']:.0f} s):", "",
                  markdown(figures["eval"])]
    return lines


def family_report(cfg, parent_eval: Optional[dict], members: list[dict]) -> list[str]:
    """One table row for the parent and one per member; accuracies where lm-eval ran."""
    tasks = list(members[0]["eval"]["tasks"]) if "eval" in members[0] else []

    def accuracies(result: Optional[dict]) -> list[str]:
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


def plot_family(cfg, members: list[dict], path: Path) -> None:
    """Held-out perplexity against parameters: the parent, each member as decomposed, then as trained."""
    if members[0]["parent_perplexity"] is None:
        return  # eval.perplexity_blocks=0: nothing to plot
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

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
