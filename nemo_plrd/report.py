"""What people read at the end of a run: plain-text tables, a stage's summary, a family's report and plot."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence


def format_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Right-aligned columns separated by two spaces, header first."""
    rows = [tuple(map(str, row)) for row in rows]
    header = tuple(map(str, header))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (header, *rows))


def fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def duration(seconds: float) -> str:
    """E.g. 41 s, 10 min 11 s, 1 h 02 min."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs} s" if minutes else f"{secs} s"


def combined_perplexity(perplexities: dict[str, float], names: Sequence[str]) -> float:
    """exp(mean loss) over the blocks of the corpora ``names`` (each scores the same number of blocks)."""
    return math.exp(sum(math.log(perplexities[name]) for name in names) / len(names))


def headline(figures: dict) -> tuple[str, list[str]]:
    """(name, corpora) of a run's headline perplexity: in-domain, over the held-out corpora the stages train
    on; where they train on none of them (a blend of one's own prefixes), unseen, over all of them."""
    if figures["in_domain"]:
        return "in-domain", figures["in_domain"]
    return "unseen", list(figures["parent_perplexity"] or {})


def headline_perplexity(figures: dict, key: str) -> Optional[float]:
    """The headline held-out perplexity of ``figures[key]`` (a {corpus: perplexity}, or None)."""
    return None if figures[key] is None else combined_perplexity(figures[key], headline(figures)[1])


def gap_closed(figures: dict, control: Optional[dict]) -> str:
    """The share of the gap between the perplexity right after the decomposition and the control's
    (the parent trained on as many tokens as one stage) that training closed."""
    if control is None or figures["member_perplexity"] is None or not figures["train_losses"]:
        return ""
    decomposed, trained, reached = (headline_perplexity(figures, "decomposed_perplexity"),
                                    headline_perplexity(figures, "member_perplexity"),
                                    headline_perplexity(control, "member_perplexity"))
    return f"{(decomposed - trained) / (decomposed - reached):.0%}"


def stage_summary(cfg, figures: dict) -> list[str]:
    """A stage's summary.md: parent vs member, the settings, lm-eval's table if it ran."""
    from nemo_plrd.evaluate import markdown

    rows = [("parameters", f"{figures['parent_params']:,}",
             f"{figures['member_params']:,} ({figures['member_params'] / figures['parent_params']:.1%})"),
            ("linear-layer parameters", f"{figures['parent_linear_params']:,}", f"{figures['member_linear_params']:,}")]
    if figures["parent_perplexity"] is not None:
        trained = bool(figures["train_losses"])
        label, corpora = headline(figures)
        rows.append((f"held-out perplexity, {label} ({', '.join(corpora)}; "
                     f"{figures['heldout_tokens']:,} tokens each)",
                     fmt(headline_perplexity(figures, "parent_perplexity")),
                     fmt(headline_perplexity(figures, "decomposed_perplexity"))))
        if trained:
            rows.append((f"  after training on {figures['train_tokens']:,} tokens", "",
                         fmt(headline_perplexity(figures, "member_perplexity"))))
        for name, parent in figures["parent_perplexity"].items():
            member = fmt(figures["decomposed_perplexity"][name]) + (
                f" -> {fmt(figures['member_perplexity'][name])}" if trained else "")
            rows.append((f"  {name}" + ("" if name in figures["in_domain"] else " (unseen genre)"), fmt(parent), member))
    prefixes, weights = cfg.dataset.blend
    data = ", ".join(prefixes) if weights is None else ", ".join(f"{w:g} x {p}" for p, w in zip(prefixes, weights))
    settings = (f"method {cfg.plrd.method} (solver {cfg.plrd.solver}, ridge {cfg.plrd.ridge:g}), plan "
                + ", ".join(f"{k}={v}" for k, v in figures["plan"].items())
                + f", calibration {figures['calibration_tokens']:,} tokens of {data}, "
                f"TP={figures['tp']} x DP={figures['dp']}")
    if figures["train_losses"]:
        train, optimizer = cfg.train, cfg.optimizer_config()
        settings += (f"; trained {train.steps} steps of {train.global_batch}x{train.seq_length} tokens "
                     f"({cfg.mixed_precision or 'fp32'}), {optimizer.optimizer} lr {optimizer.lr:g} "
                     f"(warm-up {train.warmup_steps}, {train.decay_style} to {optimizer.min_lr:g}), "
                     f"loss {figures['train_losses'][0]:.3f} -> "
                     f"{figures['train_losses'][-1]:.3f}")
        if figures["valid_losses"]:
            settings += ", validation loss " + " -> ".join(f"{loss:.3f} (step {step})"
                                                          for step, loss in figures["valid_losses"])
    lines = [f"# {Path(cfg.output).name}", "", f"parent: {figures['parent']}", "",
             format_table(("", "parent", "member"), rows), "", settings, "",
             f"Took {duration(figures['seconds'])} to decompose, train and export (a resumed stage: from its restart)."]
    if "eval" in figures:
        lines += ["", f"lm-eval on hf-{cfg.export[0]} (limit {cfg.eval.limit}, {duration(figures['eval_seconds'])}):",
                  "", markdown(figures["eval"])]
    return lines


def kept(figures: dict) -> float:
    """The share of the dense linear-layer parameters a model holds (a record without the dense count: 1, as only a
    dense parent's control could be written then)."""
    return figures["member_linear_params"] / figures.get("dense_linear_params", figures["member_linear_params"])


def family_report(cfg, parent_eval: Optional[dict], members: list[dict], baselines: dict[str, dict],
                  seconds: float) -> list[str]:
    """The perplexity table (parent, control, members, one-shot), where lm-eval ran the accuracy table, and
    where the run's ``seconds`` went."""
    from nemo_plrd.config import BASELINES

    first, control, oneshot = members[0], baselines.get("control"), baselines.get("one-shot")
    corpora = list(first["parent_perplexity"] or {})  # none: eval.perplexity_blocks=0
    label, combined = headline(first)
    # the perplexity columns: (title, cell of (figures, key of its perplexities, whether it was decomposed))
    columns: list[tuple[str, Callable[[dict, str, bool], str]]] = [
        (f"{label} ppl: decomposed",
         lambda f, key, cut: fmt(headline_perplexity(f, "decomposed_perplexity")) if cut else ""),
        ("trained", lambda f, key, cut: fmt(headline_perplexity(f, key))),
        *([("gap closed", lambda f, key, cut: gap_closed(f, control) if cut else "")] if control else []),
        *[(name if name in first["in_domain"] else f"{name} (unseen)", lambda f, key, cut, name=name: fmt(f[key][name]))
          for name in corpora]] if corpora else []
    header = ["model", "keep", "parameters", "trained on", *(title for title, _ in columns)]

    def row(model: str, keep: str, figures: dict, params: int, key: str, decomposed: bool = True) -> list[str]:
        tokens = f"{figures['train_tokens']:,}" if key == "member_perplexity" and figures["train_losses"] else ""
        return [model, keep, f"{params / 1e6:.1f}M", tokens, *(cell(figures, key, decomposed) for _, cell in columns)]

    derived = ([("control", f"{kept(control):.2g}", control)] if control else []) + [
        (f"stage {index}", f"{keep:g}", member) for index, (keep, member) in enumerate(zip(cfg.keep, members), 1)] + (
        [("one-shot", f"{cfg.keep[-1]:g}", oneshot)] if oneshot else [])
    rows = [row("parent", "", first, first["parent_params"], "parent_perplexity", decomposed=False)] + [
        row(name, keep, figures, figures["member_params"], "member_perplexity", decomposed=name != "control")
        for name, keep, figures in derived]
    models = [("parent", parent_eval)] + [(name, figures.get("eval")) for name, _, figures in derived]
    lines = [f"# PLRD family of {cfg.parent}", "", format_table(header, rows), "",
             (f"Held-out perplexity on {first['heldout_tokens']:,} tokens of each corpus's held-out documents; "
              + (f"in-domain: over those of the corpora the stages train on ({', '.join(combined)}). "
                 if first["in_domain"] else f"unseen: over all of them ({', '.join(combined)}), as the stages train "
                                            "on none. ")
              + ("Gap closed: the share of the gap between a member's perplexity right after its decomposition and "
                 "the control's (the parent trained on one stage's tokens) that its training closed. " if control
                 else "") if corpora else "")
             + "".join(f"{name.capitalize()}: {BASELINES[name]}. " for name in baselines)
             + (f"Each stage trained on {first['train_tokens']:,} tokens." if first["train_losses"] else
                "No training between stages.")]
    tasks = list(first["eval"]["tasks"]) if "eval" in first else []
    if tasks:
        from nemo_plrd.evaluate import with_stderr

        items = first["eval"]["items"]
        lines += ["", format_table(["model", *tasks], [[name, *[with_stderr(result["tasks"][task]) if result else ""
                                                               for task in tasks]] for name, result in models]), "",
                  "lm-eval accuracy (acc) ± its standard error; items per task: "
                  + ", ".join(f"{task} {items[task]}" for task in tasks) + "."]
    lines += ["", f"Took {duration(seconds)}; decomposing, training and exporting each model: "
              + ", ".join(f"{name} {duration(figures['seconds'])}" for name, _, figures in derived)
              + " (a resumed run's times count from its restart)."]
    return lines


def model_name(path: str | Path) -> str:
    """A short name for a title: a member's checkpoint (``STAGE/checkpoint``) goes by its stage's folder."""
    path = Path(path)
    return path.parent.name if path.name == "checkpoint" else path.name


def plot_family(cfg, members: list[dict], baselines: dict[str, dict], path: Path) -> None:
    """In-domain held-out perplexity against parameters: the parent, each member as decomposed and as
    trained, the baselines; and the unseen genres' perplexity of the trained family."""
    first = members[0]
    if first["parent_perplexity"] is None:
        return  # eval.perplexity_blocks=0: nothing to plot
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(figsize=(7.2, 4.6))
    params = [first["parent_params"] / 1e6] + [m["member_params"] / 1e6 for m in members]
    label = headline(first)[0]
    trained = [headline_perplexity(first, "parent_perplexity")] + [headline_perplexity(m, "member_perplexity")
                                                                   for m in members]
    after = ", trained" if first["train_losses"] else ""  # train.steps=0: each member as decomposed
    axes.plot(params, trained, "o-", label=f"{label}: parent, then each member{' after training' if after else ''}")
    for keep, member, x, y in zip(cfg.keep, members, params[1:], trained[1:]):
        axes.annotate(f"keep {keep:g}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
        axes.plot([x, x], [headline_perplexity(member, "decomposed_perplexity"), y], ":", color="gray")
    axes.plot(params[1:], [headline_perplexity(m, "decomposed_perplexity") for m in members], "x", color="tab:red",
              label=f"{label}: each member right after its decomposition")
    unseen = [name for name in first["parent_perplexity"] if name not in first["in_domain"]]
    styles = itertools.cycle(zip("s^vPh", ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")))
    for corpus, (marker, color) in zip(unseen, styles):
        axes.plot(params, [first["parent_perplexity"][corpus]] + [m["member_perplexity"][corpus] for m in members],
                  f"{marker}--", color=color, alpha=0.7, markersize=4, label=f"{corpus} (unseen genre){after}")
    for baseline, marker, color in (("control", "*", "tab:green"), ("one-shot", "D", "tab:orange")):
        if baseline in baselines:
            b = baselines[baseline]
            axes.plot([b["member_params"] / 1e6], [headline_perplexity(b, "member_perplexity")], marker, color=color,
                      markersize=10 if marker == "*" else 7, label=f"{label}: {baseline}{after}")
    axes.set(xlabel="parameters (millions)", ylabel="held-out perplexity", yscale="log",
             title=f"PLRD family of {model_name(cfg.parent)}")
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    # minor ticks at 2 and 5 x 10^k labelled too: enough to read values off, few enough not to crowd; every one
    # on an axis within a decade, which may hold no major tick and one of those (read when drawn, limits set)
    within_decade = lambda: axes.get_ylim()[1] < 10 * axes.get_ylim()[0]
    axes.yaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if within_decade() or f"{value:.0e}"[0] in "25" else ""))
    axes.tick_params(axis="y", which="minor", labelsize=7)
    axes.invert_xaxis()  # the family grows smaller to the right
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)  # where it hides the fewest points
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
