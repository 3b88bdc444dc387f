"""Continued pretraining with megatron's optimizer and scheduler: the schedule a recipe asks for,
weight decay where megatron puts it, and the loss over the tokens the mask keeps."""

import json
import math

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.optimizer import OptimizerConfig

from nemo_plrd.checkpoint import load_model, save_checkpoint
from nemo_plrd.data import DataParallelBatches, token_samples
from nemo_plrd.errors import InputError
from nemo_plrd.model import LlamaArch, build_gpt
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.train import Schedule, Trainer, keep_saved_steps, masked_loss, run

ARCH = LlamaArch(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                 vocab_size=64, max_sequence_length=32)
TOKENS = torch.randint(0, ARCH.vocab_size, (40, 9), generator=torch.Generator().manual_seed(0))


def trainer(schedule: Schedule, **optimizer) -> Trainer:
    init_model_parallel(1)
    model = build_gpt(ARCH, {"linear_qkv": 8, "linear_proj": 8, "linear_fc1": 8, "linear_fc2": 8})
    batches = DataParallelBatches(token_samples(TOKENS), 2, schedule.global_batch, 0, 1)
    return Trainer(model, OptimizerConfig(**{"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1} | optimizer),
                   schedule, batches)


def test_the_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    """Counted in samples as megatron counts them: step k has lr = lr * k / warmup, then the cosine."""
    steps, warmup = 10, 4
    t = trainer(Schedule(steps, global_batch=4, warmup_steps=warmup))
    used = [t.step()["lr"] for _ in range(steps)]
    cosine = [1e-4 + 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))) * 9e-4
              for k in range(warmup + 1, steps)]
    assert used == pytest.approx([1e-3 * k / warmup for k in range(warmup + 1)] + cosine, rel=1e-9)
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # where the schedule ends
    assert t.consumed_samples == 40


def test_weight_decay_spares_norms_and_biases():
    t = trainer(Schedule(2, global_batch=2))
    names = {id(p): name for name, p in t.model.named_parameters()}
    decay = {names[id(p)]: group["weight_decay"] for group in t.optimizer.param_groups for p in group["params"]}
    assert decay and all(v == (0.0 if name.endswith(("norm.weight", "bias")) or "layernorm" in name else 0.1)
                         for name, v in decay.items()), decay
    assert any(v == 0.0 for v in decay.values()) and any(v == 0.1 for v in decay.values())


def test_the_loss_averages_only_the_tokens_the_mask_keeps():
    t = trainer(Schedule(1, global_batch=2))
    batch = DataParallelBatches(token_samples(TOKENS), 2, 2, 0, 1).micro_batches(0)[0]
    with torch.no_grad():
        full = masked_loss(t.model, batch).item()
        batch["loss_mask"][:, 4:] = 0
        first_half = masked_loss(t.model, batch).item()
        batch["loss_mask"][:, :4], batch["loss_mask"][:, 4:] = 0, 1
        second_half = masked_loss(t.model, batch).item()
    assert full == pytest.approx((first_half + second_half) / 2, rel=1e-6)
    assert first_half != pytest.approx(second_half)
    batch["loss_mask"][:] = 0  # a micro-batch with no token kept adds nothing (megatron's count is at least 1)
    with torch.no_grad():
        assert masked_loss(t.model, batch).item() == 0



def test_validation_averages_the_same_leading_batches_every_time_and_leaves_training_untouched():
    t = trainer(Schedule(3, global_batch=4))
    valid = DataParallelBatches(token_samples(TOKENS[20:]), 2, 4, 0, 1)
    t.step()
    with torch.no_grad():
        expected = sum(masked_loss(t.model, valid.micro_batches(start)[m]).item()
                       for start in (0, 4) for m in range(2)) / 4
    assert t.validate(valid, iters=2) == pytest.approx(expected, rel=1e-6)
    assert t.validate(valid, iters=2) == pytest.approx(expected, rel=1e-6)  # no data position moves
    assert t.model.training and t.iteration == 1


def test_bf16_mixed_computes_in_bf16_on_fp32_main_weights_and_tracks_fp32():
    """megatron's mixed precision: bf16 weights that are the rounding of the optimizer's fp32 main weights
    (so updates below bf16's resolution are not lost), and losses that follow an fp32 run's updates."""
    fp32, bf16 = trainer(Schedule(6, global_batch=4)), trainer(Schedule(6, global_batch=4), bf16=True)
    frozen = trainer(Schedule(6, global_batch=4), lr=1e-12, min_lr=0.0)  # the same batches, no update that shows
    losses = {name: [t.step()["loss"] for _ in range(6)] for name, t in (("fp32", fp32), ("bf16", bf16),
                                                                          ("frozen", frozen))}
    gap = lambda other: max(abs(a - b) for a, b in zip(losses["fp32"], losses[other]))
    assert 0 < gap("bf16") < gap("frozen") / 10  # measured: 1.3e-4 against the updates' 4.1e-3
    (inner,) = bf16.optimizer.chained_optimizers  # megatron's Float16OptimizerWithFloat16Params
    main, model = (sum(groups, []) for groups in (inner.fp32_from_float16_groups, inner.float16_groups))
    assert len(main) == len(list(bf16.model.parameters())) and all(m.dtype == torch.float32 for m in main)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert all(p.main_grad.dtype == torch.float32 for p in bf16.model.parameters())  # accumulated in fp32
    assert all(torch.equal(m.bfloat16(), p) for m, p in zip(main, model))
    assert any(not torch.equal(m, p.float()) for m, p in zip(main, model))


@pytest.mark.parametrize("optimizer", [{"bf16": True}, {"optimizer": "sgd"}, {"optimizer": "sgd", "sgd_momentum": 0.0}])
def test_a_run_resumed_from_its_checkpoint_takes_the_uninterrupted_steps(tmp_path, optimizer):
    """bf16 mixed: the model's bf16 weights and the optimizer's fp32 main weights both come back from the
    checkpoint. SGD: its momentum buffers (megatron-core gives SGD no state to load them into)."""
    straight = trainer(Schedule(4, global_batch=4), **optimizer)
    expected = [straight.step()["loss"] for _ in range(4)]
    first = trainer(Schedule(4, global_batch=4), **optimizer)
    losses = [first.step()["loss"] for _ in range(2)]
    dist_checkpointing.save(first.state(), str(tmp_path))
    resumed = trainer(Schedule(4, global_batch=4), **optimizer)  # its weights (and main weights): the step-0 ones
    resumed.load_state(dist_checkpointing.load(resumed.state(is_loading=True), str(tmp_path)))
    losses += [resumed.step()["loss"] for _ in range(2)]
    assert losses == expected
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))


@pytest.mark.parametrize("optimizer", [{}, {"bf16": True}])
def test_a_training_checkpoint_loads_as_a_model(tmp_path, optimizer):
    """A stage's train/iter_* holds the optimizer, scheduler and RNG beside the weights; converted or
    named as a parent it loads the weights alone (bf16 mixed: the model's bf16 ones, into an fp32 model)."""
    trained = trainer(Schedule(4, global_batch=4), **optimizer)
    for _ in range(2):
        trained.step()
    save_checkpoint(trained.model, tmp_path / "iter_2", ARCH, state=trained.state())
    loaded, _ = load_model(tmp_path / "iter_2")
    assert all(torch.equal(a.float(), b) for a, b in zip(trained.model.parameters(), loaded.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(trainer(Schedule(4, global_batch=4)).model.parameters(),
                                                     loaded.parameters()))  # trained: not the step-0 weights


def test_the_last_step_is_logged_whatever_the_log_interval(tmp_path):
    """A stage reads its trained figures from the metrics file: a log_interval past the last step must
    not leave it empty (the stage would report the member as untrained)."""
    steps = trainer(Schedule(3, global_batch=4))
    run(steps, save=lambda t: None, save_interval=3, metrics=tmp_path / "metrics.jsonl", log_interval=10)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]


def test_a_resumed_run_drops_the_steps_after_its_checkpoint_and_a_line_cut_short(tmp_path):
    """Killed mid-append, the metrics file ends in a partial line: a step after the last save, dropped
    with the others (read as JSON it would stop every rerun)."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3)) + '{"step": 4, "lo')
    keep_saved_steps(metrics, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_a_checkpoint_whose_record_is_damaged_is_refused_naming_it(tmp_path):
    """plrd.json cut short, or not the record a save writes: refused as bad input naming the file (before: a
    JSONDecodeError, KeyError or TypeError traceback from wherever the checkpoint was read: a stage's parent or
    teacher, a conversion, a resumed stage)."""
    save_checkpoint(trainer(Schedule(1, global_batch=4)).model, tmp_path / "ckpt", ARCH)
    record = tmp_path / "ckpt" / "plrd.json"
    whole = json.loads(record.read_text())
    for text, reason in ((record.read_text()[:40], "JSONDecodeError"),
                         ("[]", "TypeError: list indices"),
                         (json.dumps({"ranks": whole["ranks"]}), "KeyError: 'arch'"),
                         (json.dumps(whole | {"arch": whole["arch"] | {"layers": 2}}), "TypeError: .*'layers'"),
                         (json.dumps(whole | {"ranks": whole["ranks"][:1]}),
                          "ValueError: 'ranks' must hold one mapping per layer, 2")):
        record.write_text(text)
        with pytest.raises(InputError, match=rf"{record} is damaged \({reason}.*\): not a checkpoint nemo_plrd can "
                                             "rebuild; use another, or run the stage that wrote it again"):
            load_model(tmp_path / "ckpt")
    record.write_text(json.dumps(whole))
    load_model(tmp_path / "ckpt")
