"""lm+kd's loss over the vocabulary: one fused pass against the KL followed by megatron's cross entropy.

    .venv/bin/python bench/distill_loss.py [--micro-batch 4 --seq-length 256 --vocab 49152] [--repeats 5]

``nemo_plrd.distill.distillation_loss("lm+kd")`` reads the LM loss off the log softmax of the
student that the KL computes. Composing the KL with megatron's ``vocab_parallel_cross_entropy``
instead normalises the student's logits a second time, and keeps its softmax (written over the
logits, in place) for the backward beside the KL's gradient: two [b, s, v] fp32 tensors live
through the backward where the fused loss keeps one. Both side by side on the main job's micro-batch (SmolLM2's
vocabulary, TP=1): the loss's forward + backward alone, median of interleaved rounds, and the
bytes each keeps for its backward (counted by a saved-tensors hook). The two agree to fp32
rounding (checked here before timing).
"""

from __future__ import annotations

import argparse

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from timing import interleaved_medians  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.distill import distillation_loss
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.report import format_table


def fused(logits, teacher, labels):
    return distillation_loss("lm+kd", logits, teacher, labels)


def composed(logits, teacher, labels):
    return distillation_loss("kd", logits, teacher, labels) + vocab_parallel_cross_entropy(logits.float(), labels)


def saved_bytes(loss, logits, teacher, labels) -> int:
    """Bytes of the storages autograd keeps for the backward of ``loss``'s graph."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss(logits, teacher, labels)
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=positive_int, default=4)
    parser.add_argument("--seq-length", type=positive_int, default=256)
    parser.add_argument("--vocab", type=positive_int, default=49152)
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    init_model_parallel(1)
    gen = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq_length, args.vocab)
    student, teacher = torch.randn(*shape, generator=gen) * 3, torch.randn(*shape, generator=gen) * 3
    labels = torch.randint(0, args.vocab, shape[:2], generator=gen)
    losses = {"fused (nemo_plrd)": fused, "KL + megatron cross entropy": composed}

    def step(loss):
        logits = student.clone().requires_grad_()
        loss(logits, teacher, labels).sum().backward()
        return logits.grad

    grads = {name: step(loss) for name, loss in losses.items()}
    values = [loss(student, teacher, labels) for loss in losses.values()]
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(*grads.values(), rtol=1e-4, atol=1e-6)
    seconds = interleaved_medians({name: (lambda loss=loss: step(loss)) for name, loss in losses.items()},
                                  args.repeats)
    base = seconds["KL + megatron cross entropy"]
    rows = [(name, f"{s * 1e3:.0f}", f"{base / s:.2f}x",
             f"{saved_bytes(loss, student.clone().requires_grad_(), teacher, labels) / 2**20:.0f}")
            for (name, loss), s in zip(losses.items(), seconds.values())]
    print(f"lm+kd loss over [{args.micro_batch}, {args.seq_length}, {args.vocab}] fp32 logits, TP=1, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds (forward + backward)")
    print(format_table(("loss", "ms", "speed-up", "MiB kept for backward"), rows))


if __name__ == "__main__":
    main()
