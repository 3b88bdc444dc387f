"""megatron-core checkpoint (dense or PLRD-factored) -> Hugging Face model directory.

    python conversion/megatron_to_hf.py CKPT_DIR OUT_DIR --format factored [--dtype parent]
    torchrun --nproc_per_node 2 conversion/megatron_to_hf.py CKPT_DIR OUT_DIR   # TP = world size

merged: factors multiplied out into the parent's stock HF class (plain from_pretrained).
factored: the factors with their modeling code (from_pretrained(..., trust_remote_code=True)).
"""

from __future__ import annotations

import argparse

from nemo_plrd.cli import run_script
from nemo_plrd.export_options import DTYPES, FORMATS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint written by hf_to_megatron.py or a PLRD stage")
    parser.add_argument("out_dir", help="HF directory to create (must not exist)")
    parser.add_argument("--format", choices=FORMATS, default="factored")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the weights' dtype; parent: the one the parent's config.json names")
    args = parser.parse_args()

    from nemo_plrd.files import refuse_existing

    refuse_existing(args.out_dir, "HF model directory")  # before anything loads

    import torch.distributed as dist

    from nemo_plrd.checkpoint import hf_folder, load_model, read_metadata
    from nemo_plrd.export import check_export_dtype, export_hf
    from nemo_plrd.parallel import init_tensor_parallel_over_world

    arch, _ = read_metadata(args.checkpoint)  # no checkpoint, or one without its architecture: refused now
    hf = hf_folder(args.checkpoint)  # and one without its HF config, before its weights load
    check_export_dtype(args.dtype, hf, "--dtype")
    init_tensor_parallel_over_world(arch)
    model, _ = load_model(args.checkpoint)
    export_hf(model, args.out_dir, hf, format=args.format, dtype=args.dtype)
    if dist.get_rank() == 0:
        print(f"wrote {args.out_dir} ({args.format}, {args.dtype})")


if __name__ == "__main__":
    run_script(main)
