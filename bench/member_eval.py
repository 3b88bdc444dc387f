"""A family member's lm-eval step: with the held-out perplexity measured again on the export vs the tasks alone.

    .venv/bin/python bench/member_eval.py [--repeats 2]

A stage measures its member's held-out perplexity on the megatron model (decomposed and trained), then exports it
and runs lm-eval on the export. Until 2026-12-07 that evaluation measured the held-out perplexity again, on the
export (the same figure: tests/test_recipes.py checks the export against the megatron model's), for each of the
main job's six models (the parent, the control, three stages, the one-shot member); now it runs the tasks alone
(``nemo_plrd.pipeline.lm_eval_only``). Both ways on the embedded SmolLM2-135M with the main job's evaluation
settings (``recipes/smollm2_135m_family.yaml``'s ``stage.eval``), in one process, in turn; each evaluation loads
the model as the family's does. The two are checked to score every task the same before any time is reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from timing import interleaved_medians, speedup_table  # bench/ is on sys.path when this runs as a script

from nemo_plrd.assets import smollm2_135m
from nemo_plrd.cli import positive_int
from nemo_plrd.config import FamilyConfig, load_config
from nemo_plrd.evaluate import evaluate
from nemo_plrd.pipeline import lm_eval_only

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_135m_family.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=2)
    args = parser.parse_args()
    settings = load_config(FamilyConfig, CONFIG, []).stage_config(0, "smollm2-135m", "unused").eval
    model = smollm2_135m()
    runs = {"again": lambda: evaluate(model, **vars(settings)), "once": lambda: evaluate(model, **lm_eval_only(settings))}
    again, once = (run() for run in runs.values())
    assert again["tasks"] == once["tasks"] and not once["perplexity"], "the two evaluations differ"
    seconds = interleaved_medians(runs, args.repeats)
    print(f"SmolLM2-135M: {len(settings.tasks)} tasks x {settings.limit} items, held-out perplexity "
          f"{settings.perplexity_blocks} x 512 tokens of {', '.join(settings.heldout)}; "
          f"median of {args.repeats} interleaved rounds after one of each")
    print(speedup_table("a member's lm-eval step", ("tasks + held-out perplexity again", seconds["again"]),
                        ("tasks alone", seconds["once"]), digits=1))


if __name__ == "__main__":
    main()
