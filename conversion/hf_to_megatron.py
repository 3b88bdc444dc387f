"""Hugging Face LLaMA / Mistral / Qwen2 checkpoint -> megatron-core dist_checkpointing checkpoint.

    python conversion/hf_to_megatron.py HF_DIR OUT_DIR
    torchrun --nproc_per_node 2 conversion/hf_to_megatron.py HF_DIR OUT_DIR   # TP = world size

The checkpoint loads at any TP size (megatron reshards on load), so one process is enough;
the output carries plrd.json (architecture, ranks) and the parent's config and tokenizer.
"""

from __future__ import annotations

import argparse

from nemo_plrd.cli import run_script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="HF model directory (config.json + safetensors)")
    parser.add_argument("out_dir", help="checkpoint directory to create (must not exist)")
    args = parser.parse_args()

    from nemo_plrd.files import refuse_existing

    refuse_existing(args.out_dir, "checkpoint directory")  # before anything loads

    import torch.distributed as dist

    from nemo_plrd.checkpoint import save_checkpoint
    from nemo_plrd.hf import check_weights, hf_arch, hf_tokenizer, import_hf
    from nemo_plrd.model import parameter_count
    from nemo_plrd.parallel import init_tensor_parallel_over_world

    arch = hf_arch(args.hf_dir)  # refuse a missing directory, an unsupported architecture or no weights first
    check_weights(args.hf_dir)
    hf_tokenizer(args.hf_dir)  # the checkpoint carries it: its export and a stage started from it read it
    init_tensor_parallel_over_world(arch)
    model, arch = import_hf(args.hf_dir)
    save_checkpoint(model, args.out_dir, arch, hf_source=args.hf_dir)
    if dist.get_rank() == 0:
        print(f"wrote {args.out_dir}: {parameter_count(model):,} parameters, TP={dist.get_world_size()}")


if __name__ == "__main__":
    run_script(main)
