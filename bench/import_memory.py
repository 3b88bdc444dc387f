"""Host memory of one TP rank importing an HF checkpoint: tensors read one at a time vs the whole model.

    .venv/bin/python bench/import_memory.py [--tp 3] [HF_DIR]      # default: the embedded SmolLM2-135M

``nemo_plrd.hf.load_hf_weights`` reads a safetensors checkpoint tensor by tensor
(``SafetensorsWeights``) and keeps only the rank's shard of each; before, every rank loaded the
whole model with ``from_pretrained`` in fp32. Each way builds TP rank 0's shard (``to_megatron``)
in a fresh process, whose peak resident memory (``ru_maxrss``) is printed beside the other's,
less that of a process that only imports the same modules. The two shards are checked equal.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from nemo_plrd.cli import positive_int
from nemo_plrd.report import format_table

WAYS = ("tensor by tensor", "whole model")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def shard(hf_dir: str, tp: int, way: str) -> None:
    """In this process: rank 0's shard of ``hf_dir`` built the ``way`` given; prints the peak and a checksum."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_plrd.hf import SafetensorsWeights, arch_from_hf, to_megatron

    arch = arch_from_hf(AutoConfig.from_pretrained(hf_dir))
    if way == "imports only":
        state = {}
    elif way == WAYS[0]:
        state = to_megatron(SafetensorsWeights(hf_dir), arch, tp, 0)
    else:
        state = to_megatron(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict(), arch, tp, 0)
    print(json.dumps({"peak": peak_mib(), "shard_mib": sum(
        t.numel() * t.element_size() for t in state.values()) / 2**20,
        "checksum": sum(float(t.double().sum()) for t in state.values())}))


def measure(hf_dir: str, tp: int, way: str) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", way, "--tp", str(tp), hf_dir],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", nargs="?")
    parser.add_argument("--tp", type=positive_int, default=3, help="default 3: SmolLM2-135M has 3 KV heads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return shard(args.hf_dir, args.tp, args.child)
    from nemo_plrd.assets import smollm2_135m
    from nemo_plrd.errors import InputError
    from nemo_plrd.hf import hf_arch
    from nemo_plrd.model import check_tensor_parallel

    hf_dir = args.hf_dir or str(smollm2_135m())
    try:  # a shard megatron would never hold (query groups split, uneven MLP shards) measures nothing real
        check_tensor_parallel(hf_arch(hf_dir), args.tp, "--tp")
    except InputError as error:
        parser.error(str(error))
    base = measure(hf_dir, args.tp, "imports only")["peak"]
    results = {way: measure(hf_dir, args.tp, way) for way in WAYS}
    first, second = results.values()
    assert abs(first["checksum"] - second["checksum"]) <= 1e-6 * abs(second["checksum"]), results
    rows = [(way, f"{r['shard_mib']:.0f}", f"{r['peak'] - base:.0f}",
             f"{(results[WAYS[1]]['peak'] - base) / (r['peak'] - base):.2f}x") for way, r in results.items()]
    print(f"{hf_dir}: TP rank 0 of {args.tp}, one process per way; peak resident memory above a process that "
          f"only imports ({base:.0f} MiB)")
    print(format_table(("read", "shard MiB", "peak MiB", "whole model / this"), rows))


if __name__ == "__main__":
    main()
