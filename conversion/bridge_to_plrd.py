"""A Megatron-Bridge PLRD stage's checkpoint -> a self-describing nemo-plrd checkpoint.

    python conversion/bridge_to_plrd.py SAVE_DIR OUT_DIR --hf-path HF_DIR [--iteration N]
    torchrun --nproc_per_node 2 conversion/bridge_to_plrd.py ...     # TP = world size

SAVE_DIR is the stage's ``checkpoint.save`` (Bridge's ``iter_*`` folders and the stage's
``plrd_plan.json``); HF_DIR the parent the stage started from (its config and tokenizer go
into OUT_DIR). OUT_DIR then exports with ``megatron_to_hf.py`` (merged or factored) and is the
``parent`` of a next stage in ``recipes/decompose.py``.
"""

from __future__ import annotations

import argparse

from nemo_plrd.cli import run_script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save", help="the Bridge stage's checkpoint.save")
    parser.add_argument("out_dir", help="checkpoint directory to create (must not exist)")
    parser.add_argument("--hf-path", required=True, help="the HF parent of the stage")
    parser.add_argument("--iteration", type=int, help="default: the newest saved, which must be the last of the "
                        "job's train.train_iters (a stage that stopped early is refused)")
    args = parser.parse_args()

    from nemo_plrd.files import refuse_existing

    refuse_existing(args.out_dir, "checkpoint directory")  # before anything loads

    import torch.distributed as dist

    from nemo_plrd.bridge.checkpoint import load_bridge_stage
    from nemo_plrd.checkpoint import save_checkpoint
    from nemo_plrd.hf import hf_arch
    from nemo_plrd.parallel import init_tensor_parallel_over_world

    init_tensor_parallel_over_world(hf_arch(args.hf_path))
    model, arch = load_bridge_stage(args.save, args.hf_path, args.iteration)
    save_checkpoint(model, args.out_dir, arch, args.hf_path)
    if dist.get_rank() == 0:
        print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    run_script(main)
