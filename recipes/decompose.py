"""One PLRD decomposition stage: a parent -> one smaller family member, exported and evaluated.

    python recipes/decompose.py --config recipes/smollm2_135m.yaml [key=value ...]
    torchrun --nproc_per_node 3 recipes/decompose.py --config recipes/smollm2_135m.yaml \
        parallel.tensor_model_parallel_size=3 output=runs/smollm2-135m-60-tp3            # TP = 3

The parent is an HF model directory (imported dense), a PLRD checkpoint (a member made
earlier: its factors are re-truncated, never multiplied out) or the embedded SmolLM2-135M.
It is calibrated on the stage's data (megatron indexed datasets, ``dataset.blend``), decomposed
to the planned ranks and written to OUTPUT:

    plan.json, plan.txt   every slot's rank (nemo_plrd.plan)
    checkpoint/           megatron dist_checkpointing, any TP size; the next stage's parent
    hf-factored/          the factors, loading with trust_remote_code=True
    hf-merged/            W = U V in the parent's stock HF class
    eval/                 lm-eval accuracies of the first export (if eval.tasks)
    summary.md, .json     sizes, held-out perplexity before and after, the settings

With ``train.steps`` > 0 the member continues pretraining at its new rank (megatron's DDP,
optimizer and scheduler; ``nemo_plrd.train``) before it is saved, exported and evaluated.
Everything goes to OUTPUT.partial first and is renamed when complete; the same command run
again after an interruption resumes where the last save left off (``nemo_plrd.pipeline``).
"""

from pathlib import Path

from nemo_plrd.cli import recipe_config, run_script


def main() -> None:
    cfg = recipe_config("DecomposeConfig", __doc__, "recipes/smollm2_135m.yaml",
                        "plrd.plan.keep=0.4 output=runs/smollm2-135m-40")
    from nemo_plrd.parallel import init_distributed
    from nemo_plrd.pipeline import init_parallel, run_stage, sole_run

    init_distributed()
    init_parallel(cfg)
    with sole_run(cfg.output):
        figures = run_stage(cfg)
    if figures is not None:
        print((Path(cfg.output) / "summary.md").read_text(), f"wrote {cfg.output}", sep="\n")


if __name__ == "__main__":
    run_script(main)
