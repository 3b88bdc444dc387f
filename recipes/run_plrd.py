"""One PLRD stage as a Megatron-Bridge pretraining job (the command-line shape of Bridge's run_recipe.py).

    python recipes/run_plrd.py --hf-path HF_DIR [--recipe MODULE:FUNCTION] [--config-file YAML] [key=value ...]
    python recipes/run_plrd.py --parent PLRD_CKPT ...      # stage k > 1 (conversion/bridge_to_plrd.py)
    torchrun --nproc_per_node 8 recipes/run_plrd.py --hf-path HF_DIR --config-file recipes/bridge/llama_stage.yaml \\
        dataset.blend='[[data/corpus_text_document], null]' checkpoint.save=runs/stage1 plrd.plan.keep=0.6

``--recipe`` is a function returning the job's ``PLRDConfigContainer`` from ``hf_path``
(default ``nemo_plrd.bridge.recipe:llama_stage``); the YAML file and the overrides are applied by
Bridge's ``process_config_with_overrides`` (``plrd.*`` keys validated by nemo-plrd first). The
stage loads the HF weights, calibrates on the job's train split, decomposes, and trains with
Bridge's ``pretrain`` (``train.loss=kd`` or ``lm+kd``: distilled from ``train.teacher``, as a
local stage is); its ranks go to ``checkpoint.save/plrd_plan.json``, its metrics to
``checkpoint.save/metrics.jsonl``. Run again after an interruption, the same command resumes
from the last checkpoint (other ``plrd.*`` settings or another parent are refused).
"""

import argparse
from pathlib import Path

from nemo_plrd.bridge import load_recipe, recipe_function
from nemo_plrd.errors import InputError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", help="stage 1's parent: an HF LLaMA-family model directory")
    parser.add_argument("--parent", help="a later stage's parent: the previous stage's nemo-plrd checkpoint")
    parser.add_argument("--recipe", default="nemo_plrd.bridge.recipe:llama_stage", help="MODULE:FUNCTION")
    parser.add_argument("--config-file", help="YAML applied over the recipe's config")
    parser.add_argument("overrides", nargs="*", help="Hydra-style key=value overrides, applied last")
    args = parser.parse_args()
    if (args.hf_path is None) == (args.parent is None):
        parser.error("give one of --hf-path (stage 1) and --parent (a later stage)")
    hf_path = args.hf_path or str(Path(args.parent) / "hf")  # a checkpoint carries its HF config and tokenizer
    # torch and megatron load here, not at the top: megatron's first checkpoint save on each rank starts a helper
    # process that imports this script again, which then costs it no import of them
    from nemo_plrd.hf import model_type

    try:
        recipe_function(args.recipe, "--recipe")  # the form at once; the function once Bridge is there
        if args.parent is not None and not (Path(args.parent) / "metadata.json").is_file():
            raise InputError(f"--parent {args.parent} is not a nemo-plrd checkpoint (no metadata.json): make one of "
                             "the previous stage's Bridge checkpoint with conversion/bridge_to_plrd.py")
        model_type(hf_path, "(--hf-path) is not a Hugging Face model directory" if args.hf_path else
                   "(the --parent checkpoint's HF config and tokenizer) is missing")
    except InputError as error:
        parser.error(str(error))

    from nemo_plrd.bridge import require_bridge

    require_bridge()
    from megatron.bridge.training.pretrain import pretrain

    from nemo_plrd.bridge.config import process_plrd_config
    from nemo_plrd.bridge.distill import stage_forward_step
    from nemo_plrd.bridge.stage import prepare_stage, stage_callbacks

    cfg = load_recipe(args.recipe, "--recipe")(hf_path=hf_path)
    cfg = process_plrd_config(cfg, args.config_file, args.overrides)
    step = stage_forward_step(cfg, hf_path, args.parent)  # the teacher checked before any work
    cfg = prepare_stage(cfg, hf_path, args.parent)
    pretrain(cfg, step, callbacks=stage_callbacks(cfg))


if __name__ == "__main__":  # checkpoint writers re-import the main module
    from nemo_plrd.cli import run_script

    run_script(main)
