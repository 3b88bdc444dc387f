"""Applying a rank plan to a GPTModel: optimal per slot, equal at TP=1 and TP=2, re-truncates."""

import functools

import pytest
import torch

import nemo_plrd.model as model_module
from nemo_plrd.checkpoint import load_model, save_checkpoint
from nemo_plrd.layers import LowRankColumnParallelLinear, LowRankRowParallelLinear
from nemo_plrd.model import LlamaArch, build_gpt, gpt_forward
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.plan import plan_ranks
from nemo_plrd.slots import decoder_layers, layer_slots
from nemo_plrd.model import parameter_count
from nemo_plrd.transform import RIDGE, PLRDTransform, apply_plan, plan_for, slot_spectra
from tp_utils import shared_tmp, tp_gather

ARCH = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                 num_query_groups=2, vocab_size=128, max_sequence_length=64)
SHAPES = [ARCH.slot_shapes()] * ARCH.num_layers
BATCHES = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return tp_gather(gpt_forward(model, BATCHES[0]), -1)


def decomposed(tp: int, method: str, solver: str, sequence_parallel: bool = False, keep: float = 0.5):
    init_model_parallel(tp, seed=5)
    model = build_gpt(ARCH, sequence_parallel=sequence_parallel)
    apply_plan(model, plan_ranks(SHAPES, keep=keep), BATCHES, method, progress=False, solver=solver)
    return model


@pytest.mark.parametrize("tp_size", [2], indirect=True)
@pytest.mark.parametrize("method,solver", [("activation", "exact"), ("svd", "exact"), ("activation", "randomized")])
def test_decomposed_model_is_the_same_at_tp1_and_tp2(tp_size, method, solver):
    expected = logits(decomposed(1, method, solver))
    for sequence_parallel in (False, True):
        model = decomposed(tp_size, method, solver, sequence_parallel)
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-4)
    plan = plan_ranks(SHAPES, keep=0.5)
    for layer in decoder_layers(model):
        for slot in layer_slots(layer):
            assert isinstance(slot.module, (LowRankColumnParallelLinear, LowRankRowParallelLinear))
            assert slot.module.rank == plan.rank(slot.layer, slot.name)


def slot_inputs(model, layer: int = 0, names=("linear_qkv", "linear_proj")):
    """The calibration inputs of some slots of one layer, [tokens, in], fp64."""
    seen = {}
    slots = [slot for slot in layer_slots(decoder_layers(model)[layer]) if slot.name in names]
    hooks = [slot.module.register_forward_pre_hook(
        lambda m, args, name=slot.name: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for slot in slots]
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
    inputs = slot_inputs(model)  # layer 0's attention: from the embeddings, as in the dense model
    attention = decoder_layers(model)[0].self_attention
    dense = {name: getattr(attention, name).weight.detach().clone() for name in inputs}
    plan = plan_ranks(SHAPES, keep=0.5)
    apply_plan(model, plan, BATCHES, "activation", progress=False, ridge=0.0)  # the plain objective
    for name, x in inputs.items():
        slot = getattr(attention, name)
        error, best = error_and_optimum(dense[name], slot.up.weight @ slot.down.weight, x, slot.rank)
        assert error == pytest.approx(best, rel=1e-4)  # fp32 factors of an fp64 optimum

    # Stage 2: re-truncate the factors; the best rank-r' approximation of the stage-1 product.
    qkv = attention.linear_qkv
    product = (qkv.up.weight @ qkv.down.weight).detach().clone()
    apply_plan(model, plan_ranks(SHAPES, keep=0.25), BATCHES, "activation", progress=False, ridge=0.0)
    qkv = attention.linear_qkv
    assert qkv.rank == plan_ranks(SHAPES, keep=0.25).rank(0, "linear_qkv") < plan.rank(0, "linear_qkv")
    error, best = error_and_optimum(product, qkv.up.weight @ qkv.down.weight, inputs["linear_qkv"], qkv.rank)
    assert error == pytest.approx(best, rel=1e-4)


def test_later_column_slots_reach_the_optimum_of_the_target_objective():
    """Layer 1's qkv and fc1 see inputs perturbed by the decomposed layer 0 (and attention); their
    factors minimise the ridge objective ||W X_t - U V X||^2 + lam ||U V||^2 against the dense
    model's inputs X_t."""
    init_model_parallel(1, seed=5)
    model = build_gpt(ARCH)
    names = ("linear_qkv", "linear_fc1")
    targets = slot_inputs(model, 1, names)
    layer = decoder_layers(model)[1]
    dense = {slot.name: slot.module.weight.detach().double().clone() for slot in layer_slots(layer)}
    apply_plan(model, plan_ranks(SHAPES, keep=0.5), BATCHES, progress=False)
    inputs = slot_inputs(model, 1, names)
    for slot in layer_slots(layer):
        if slot.name not in names:
            continue
        w, x, x_t = dense[slot.name], inputs[slot.name], targets[slot.name]
        assert (x - x_t).norm() > 1e-3 * x_t.norm()  # the inputs really moved
        # ||W X_t - M X||^2 + lam ||M||^2 is least squares on X, Y = X_t W^T stacked over sqrt(lam) I, 0.
        lam = RIDGE * x.square().sum(0).mean()  # ridge * mean(diag(X^T X))
        x_aug = torch.cat([x, lam.sqrt() * torch.eye(x.shape[1], dtype=x.dtype)])
        y_aug = torch.cat([x_t @ w.T, torch.zeros(x.shape[1], w.shape[0], dtype=x.dtype)])
        best_full = torch.linalg.lstsq(x_aug, y_aug).solution.T  # argmin over all M
        kept = torch.linalg.eigvalsh(best_full @ (x_aug.T @ x_aug) @ best_full.T).flip(0)[:slot.module.rank].sum()
        optimum = (y_aug.square().sum() - kept).item()
        approx = (slot.module.up.weight @ slot.module.down.weight).double()
        error = (y_aug - x_aug @ approx.T).square().sum().item()
        assert error == pytest.approx(optimum, rel=1e-3)  # fp32 model, fp64 optimum
        # the optimum as if the inputs had not moved (target W X) misses it by more than that tolerance
        gram = x_aug.T @ x_aug
        plain_full = torch.linalg.lstsq(x_aug, torch.cat([x @ w.T, y_aug[len(x):]])).solution.T
        top = torch.linalg.eigh(plain_full @ gram @ plain_full.T).eigenvectors[:, -slot.module.rank:]
        plain = top @ top.T @ plain_full
        assert (y_aug - x_aug @ plain.T).square().sum().item() > optimum * (1 + 1e-3)


@pytest.mark.parametrize("tp_size", [2], indirect=True)
@pytest.mark.parametrize("loaded", [False, True])
def test_a_model_decomposed_at_tp2_checkpoints_and_loads_at_tp1(tp_size, tmp_path_factory, monkeypatch, loaded):
    """The replaced slots keep megatron's checkpoint layout (a gated fc1's [gate; up] rows included).
    ``loaded``: built as a Bridge stage builds it, uninitialised, its weights loaded after; megatron-core
    0.16 then leaves the dense weights unmarked as split over TP (no stride 2 on fc1)."""
    root = shared_tmp(tmp_path_factory, f"decomposed-{loaded}")
    init_model_parallel(tp_size, seed=5)
    model = build_gpt(ARCH)
    if loaded:
        weights = model.state_dict()
        monkeypatch.setattr(model_module, "transformer_config", functools.partial(uninitialised, model_module.transformer_config))
        model = build_gpt(ARCH)
        assert not model.config.perform_initialization  # built as Bridge builds it
        model.load_state_dict(weights)
    with torch.no_grad():  # large weights: every block moves the logits, so a misplaced row shows
        for param in model.parameters():
            param.mul_(8 if param.dim() > 1 else 1)
    plan = plan_ranks(SHAPES, keep=0.5)
    apply_plan(model, plan, BATCHES, progress=False)
    # the factors counted as split over TP (megatron's own embedding is left unmarked by 0.16 when loaded)
    assert sum(parameter_count(slot.module) for layer in decoder_layers(model) for slot in layer_slots(layer)) \
        == plan.slot_params
    expected = logits(model)
    save_checkpoint(model, f"{root}/tp2", ARCH)

    init_model_parallel(1, seed=6)
    loaded, _ = load_model(f"{root}/tp2")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("tp_size", [2], indirect=True)
def test_a_model_built_to_be_loaded_is_counted_and_planned_as_an_initialised_one(tp_size, monkeypatch):
    """megatron-core before 0.19 marks no weight of a model built uninitialised (as a Bridge stage builds it) as
    split over TP: its dense weights and embedding counted once per rank, a target_params plan took that budget
    for its slots. Planning and the transform mark them as megatron marks an initialised model's."""
    init_model_parallel(tp_size, seed=5)
    initialised = build_gpt(ARCH)
    monkeypatch.setattr(model_module, "transformer_config",
                        functools.partial(uninitialised, model_module.transformer_config))
    loaded = build_gpt(ARCH)
    loaded.load_state_dict(initialised.state_dict())
    target = parameter_count(initialised) * 3 // 4
    assert plan_for(loaded, target_params=target).layer_ranks() == \
        plan_for(initialised, target_params=target).layer_ranks()

    def marks(model):
        return {name: [getattr(p, key, None) for key in ("tensor_model_parallel", "partition_dim", "partition_stride")]
                for name, p in model.named_parameters()}

    assert marks(loaded) == marks(initialised) and parameter_count(loaded) == parameter_count(initialised)
    fresh = build_gpt(ARCH)  # the transform alone, with a plan made elsewhere, as a pre-wrap hook
    fresh.load_state_dict(initialised.state_dict())
    plan = plan_for(initialised, target_params=target)
    PLRDTransform(plan, lambda: BATCHES)([fresh])
    apply_plan(initialised, plan, BATCHES, progress=False)
    assert marks(fresh) == marks(initialised) and parameter_count(fresh) == plan.params


def test_a_plan_that_factors_no_slot_keeps_the_dense_checkpoint_layout(tmp_path_factory):
    """Every slot kept (explicit ranks {}, as a control's): its checkpoint loads as a dense model's."""
    root = shared_tmp(tmp_path_factory, "kept-dense")
    init_model_parallel(1, seed=5)
    model = build_gpt(ARCH)
    apply_plan(model, plan_for(model, (), ranks={}), BATCHES, progress=False)
    save_checkpoint(model, f"{root}/dense", ARCH)
    loaded, _ = load_model(f"{root}/dense")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def uninitialised(transformer_config, *args, **kwargs):
    config = transformer_config(*args, **kwargs)
    config.perform_initialization = False
    return config


def test_explicit_ranks_are_planned_without_calibration_whatever_the_allocation():
    """The family's control (ranks {}: every slot kept) in a family allocated by spectrum reads no data."""
    init_model_parallel(1)
    plan = plan_for(build_gpt(ARCH), (), allocation="spectrum", ranks={})
    assert plan.layer_ranks() == [dict.fromkeys(SHAPES[0])] * ARCH.num_layers


def test_transform_refuses_plans_it_cannot_apply():
    init_model_parallel(1, seed=5)
    model = build_gpt(ARCH)
    with pytest.raises(ValueError, match="the plan has 3 layers; the model has 2"):
        apply_plan(model, plan_ranks([ARCH.slot_shapes()] * 3, keep=0.5), BATCHES)
    mlp_only = [{slot: shape for slot, shape in layer.items() if slot.startswith("linear_fc")} for layer in SHAPES]
    with pytest.raises(ValueError, match=r"the plan does not cover the model's slots \(layer, slot\): missing "
                                         r"\[\(0, 'linear_proj'\), \(0, 'linear_qkv'\), \(1, 'linear_proj'\)"):
        apply_plan(model, plan_ranks(mlp_only, keep=0.5), BATCHES)
    with pytest.raises(ValueError, match="method='qr' is not one of"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), BATCHES, method="qr")
    with pytest.raises(ValueError, match="solver='lanczos' is not one of"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), BATCHES, solver="lanczos")
    with pytest.raises(ValueError, match="ridge=-0.1 must be a number >= 0"):
        PLRDTransform(plan_ranks(SHAPES, keep=0.5), lambda: BATCHES, ridge=-0.1)
    with pytest.raises(ValueError, match="needs calibration batches"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), [])
    PLRDTransform(plan_ranks(SHAPES, keep=0.25), lambda: BATCHES)([model])
    with pytest.raises(ValueError, match="has rank 16; a plan can only lower it"):
        apply_plan(model, plan_ranks(SHAPES, keep=0.5), BATCHES)


class TELayerNormColumnParallelLinear(torch.nn.Module):
    """Test-only stand-in for Transformer Engine's fused norm + column-parallel linear (TE is not
    installed here): what the transform can see of one, a weight and the fused norm's weight."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.weight = linear.weight
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(linear.input_size))


def test_a_slot_with_its_norm_fused_inside_is_refused_before_any_work():
    init_model_parallel(1, seed=5)
    model = build_gpt(ARCH)
    attention = decoder_layers(model)[1].self_attention
    attention.linear_qkv = TELayerNormColumnParallelLinear(attention.linear_qkv)
    fused = "layer 1 linear_qkv is a TELayerNormColumnParallelLinear: its input norm is fused inside the linear layer"
    with pytest.raises(ValueError, match=fused):
        plan_for(model, BATCHES, keep=0.5)
    with pytest.raises(ValueError, match=fused):
        PLRDTransform(plan_ranks(SHAPES, keep=0.5), lambda: BATCHES)([model])
    assert all(type(slot.module).__name__ in ("ColumnParallelLinear", "RowParallelLinear")  # nothing decomposed
               for slot in layer_slots(decoder_layers(model)[0]))
    attention.linear_qkv = torch.nn.Linear(64, 128)
    with pytest.raises(ValueError, match="layer 1 linear_qkv is a Linear, which PLRD cannot decompose; supported: "
                                         "ColumnParallelLinear and LowRankColumnParallelLinear"):
        plan_for(model, BATCHES, keep=0.5)


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
    # a column slot's spectrum is measured under the ridge the decomposition will use
    plain = slot_spectra(model, BATCHES, progress=False, ridge=0.0)
    assert not torch.allclose(plain[0]["linear_qkv"], got[0]["linear_qkv"], rtol=1e-3)
    torch.testing.assert_close(plain[0]["linear_fc2"], got[0]["linear_fc2"])  # a row slot has no ridge

    # Plan by spectrum, apply, then plan a second stage: it fits, lowers ranks, meets its target.
    plan = plan_for(model, BATCHES, allocation="spectrum", keep=0.5)
    apply_plan(model, plan, BATCHES, progress=False)
    assert parameter_count(model) == plan.params
    second = plan_for(model, BATCHES, allocation="spectrum", target_params=plan.params - 4000)
    apply_plan(model, second, BATCHES, progress=False)
    assert parameter_count(model) == second.params <= plan.params - 4000
    assert all(s.rank <= plan.rank(s.layer, s.slot) for s in second.slots)
