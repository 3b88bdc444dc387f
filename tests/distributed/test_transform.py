"""Applying a rank plan to a GPTModel: optimal per slot, equal at TP=1 and TP=2, re-truncates."""

import pytest
import torch

from nemo_plrd.layers import LowRankColumnParallelLinear, LowRankRowParallelLinear
from nemo_plrd.model import LlamaArch, build_gpt, gpt_forward
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.plan import plan_ranks
from nemo_plrd.slots import decoder_layers, layer_slots
from nemo_plrd.model import parameter_count
from nemo_plrd.transform import PLRDTransform, apply_plan, plan_for, slot_spectra
from tp_utils import tp_gather

ARCH = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                 num_query_groups=2, vocab_size=128, max_sequence_length=64)
SHAPES = [ARCH.slot_shapes()] * ARCH.num_layers
BATCHES = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return tp_gather(gpt_forward(model, BATCHES[0]), -1)


def decomposed(tp: int, method: str, sequence_parallel: bool = False, keep: float = 0.5):
    init_model_parallel(tp, seed=5)
    model = build_gpt(ARCH, sequence_parallel=sequence_parallel)
    apply_plan(model, plan_ranks(SHAPES, keep=keep), BATCHES, method, progress=False)
    return model


@pytest.mark.parametrize("tp_size", [2], indirect=True)
@pytest.mark.parametrize("method", ["activation", "svd"])
def test_decomposed_model_is_the_same_at_tp1_and_tp2(tp_size, method):
    expected = logits(decomposed(1, method))
    for sequence_parallel in (False, True):
        model = decomposed(tp_size, method, sequence_parallel)
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-4)
    plan = plan_ranks(SHAPES, keep=0.5)
    for layer in decoder_layers(model):
        for slot in layer_slots(layer):
            assert isinstance(slot.module, (LowRankColumnParallelLinear, LowRankRowParallelLinear))
            assert slot.module.rank == plan.rank(slot.layer, slot.name)


def layer0_attention_inputs(model):
    """Calibration inputs of layer 0's qkv and proj (they come from the embeddings)."""
    seen = {}
    attention = decoder_layers(model)[0].self_attention
    hooks = [getattr(attention, name).register_forward_pre_hook(
        lambda m, args, name=name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for name in ("linear_qkv", "linear_proj")]
    with torch.no_grad():
        for tokens in BATCHES:
            gpt_forward(model, tokens)
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


def error_and_optimum(weight, approx, x, rank):
    cov = x.T @ x / x.shape[0]
    diff = (weight - approx).double()
    best = torch.linalg.eigvalsh(weight.double() @ cov @ weight.double().T).flip(0)[rank:].sum()
    return torch.trace(diff @ cov @ diff.T).item(), best.item()


def test_each_slot_reaches_its_activation_optimum_and_retruncation_too():
    init_model_parallel(1, seed=5)
    model = build_gpt(ARCH)
    inputs = layer0_attention_inputs(model)
    attention = decoder_layers(model)[0].self_attention
    dense = {name: getattr(attention, name).weight.detach().clone() for name in inputs}
    plan = plan_ranks(SHAPES, keep=0.5)
    apply_plan(model, plan, BATCHES, "activation", progress=False)
    for name, x in inputs.items():
        slot = getattr(attention, name)
        error, best = error_and_optimum(dense[name], slot.up.weight @ slot.down.weight, x, slot.rank)
        assert error == pytest.approx(best, rel=1e-4)  # fp32 factors of an fp64 optimum

    # Stage 2: re-truncate the factors; the best rank-r' approximation of the stage-1 product.
    qkv = attention.linear_qkv
    product = (qkv.up.weight @ qkv.down.weight).detach().clone()
    apply_plan(model, plan_ranks(SHAPES, keep=0.25), BATCHES, "activation", progress=False)
    qkv = attention.linear_qkv
    assert qkv.rank == plan_ranks(SHAPES, keep=0.25).rank(0, "linear_qkv") < plan.rank(0, "linear_qkv")
    error, best = error_and_optimum(product, qkv.up.weight @ qkv.down.weight, inputs["linear_qkv"], qkv.rank)
    assert error == pytest.approx(best, rel=1e-4)


def test_transform_refuses_plans_it_cannot_apply():
    init_model_parallel(1, seed=5)
    model = build_gpt(ARCH)
    with pytest.raises(ValueError, match="the plan has 3 layers; the model has 2"):
        apply_plan(model, plan_ranks([ARCH.slot_shapes()] * 3, keep=0.5), BATCHES)
    with pytest.raises(ValueError, match="method='qr' is not one of"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), BATCHES, method="qr")
    with pytest.raises(ValueError, match="needs calibration batches"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), [])
    PLRDTransform(plan_ranks(SHAPES, keep=0.25), lambda: BATCHES)([model])
    with pytest.raises(ValueError, match="has rank 16; a plan can only lower it"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), BATCHES)


@pytest.mark.parametrize("tp_size", [2], indirect=True)
def test_spectra_are_the_same_at_tp1_and_tp2_and_plan_the_model(tp_size):
    def spectra(tp):
        init_model_parallel(tp, seed=5)
        model = build_gpt(ARCH)
        return model, slot_spectra(model, BATCHES, progress=False)

    _, expected = spectra(1)
    model, got = spectra(tp_size)
    for layer_expected, layer_got in zip(expected, got):
        for name in layer_expected:
            torch.testing.assert_close(layer_got[name], layer_expected[name], rtol=1e-6, atol=1e-6)

    # Plan by spectrum, apply, then plan a second stage: it fits, lowers ranks, meets its target.
    plan = plan_for(model, BATCHES, allocation="spectrum", keep=0.5)
    apply_plan(model, plan, BATCHES, progress=False)
    assert parameter_count(model) == plan.params
    second = plan_for(model, BATCHES, allocation="spectrum", target_params=plan.params - 4000)
    apply_plan(model, second, BATCHES, progress=False)
    assert parameter_count(model) == second.params <= plan.params - 4000
    assert all(s.rank <= plan.rank(s.layer, s.slot) for s in second.slots)
