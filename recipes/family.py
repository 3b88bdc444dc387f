"""The PLRD family: from one parent, stage after stage of decomposition and continued pretraining.

    python recipes/family.py --config recipes/smollm2_135m_family.yaml [key=value ...]
    torchrun --nproc_per_node 2 recipes/family.py --config recipes/smollm2_135m_family.yaml \
        stage.train.global_batch=8 output=runs/family-dp2   # DP = 2: micro_batch x 2 ranks

Stage 1 decomposes the parent to ``keep[0]`` of its dense linear-layer parameters and trains
at that rank; stage k re-truncates stage k-1's checkpoint to ``keep[k-1]`` (the factors are
never multiplied out) and trains again. Each stage is ``recipes/decompose.py``'s, with the
settings under ``stage:``. When all stages are trained, rank 0 evaluates every member with
lm-eval (so no rank waits on another's evaluation). OUTPUT holds:

    stage1-keep0.6/ ...     each stage as recipes/decompose.py writes it (checkpoint, exports),
                            without its own eval/: the family evaluates every model in eval/
    control/, one-shot-keep0.25/
                            the baselines (``baselines:``), each a stage of its own: the parent
                            trained like one stage at its own ranks (dense, or a member parent's);
                            the parent decomposed straight to the last keep and trained on all the
                            stages' tokens
    eval/                   lm-eval of the parent (an HF parent), every member and every baseline
    family.md, family.json  one row per model: parameters, held-out perplexity (in-domain and per
                            corpus) after the decomposition and after training, the share of the
                            gap to the control closed; lm-eval accuracies with standard errors
    family.png              held-out perplexity against parameters, before and after training
                            (none with eval.perplexity_blocks=0)

Everything goes to OUTPUT.partial first and is renamed when complete. Interrupted, the same
command resumes: finished stages are kept as they are, a stage in training continues from its
last checkpoint, and finished evaluations are read back.
"""

from pathlib import Path

from nemo_plrd.cli import recipe_config, run_script


def main() -> None:
    cfg = recipe_config("FamilyConfig", __doc__, "recipes/smollm2_135m_family.yaml",
                        "'keep=[0.5, 0.3]' stage.train.steps=100 output=runs/family-long")
    from nemo_plrd.config import keys_under
    from nemo_plrd.parallel import init_distributed
    from nemo_plrd.pipeline import init_parallel, run_family, sole_run

    init_distributed()
    with keys_under("stage."):
        init_parallel(cfg.stage_config(0, cfg.parent, cfg.output))  # every stage has the same layout
    with sole_run(cfg.output):
        lines = run_family(cfg)
    if lines is not None:
        written = [name for name in ("family.md", "family.json", "family.png") if (Path(cfg.output) / name).is_file()]
        print("\n".join(lines), f"\n{cfg.output}: {', '.join(written)}, one folder per stage", sep="\n")


if __name__ == "__main__":
    run_script(main)
