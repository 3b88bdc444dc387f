"""Rank plans: budgets met within 1% and never exceeded, break-even respected, bad requests refused."""

import json
import re

import pytest
import torch

from nemo_plrd.family_plan import other_params
from nemo_plrd.model import SMOLLM2_135M
from nemo_plrd.plan import RankPlan, plan_ranks

SHAPES = [SMOLLM2_135M.slot_shapes()] * SMOLLM2_135M.num_layers
SLOT_PARAMS = sum(o * i for o, i in SMOLLM2_135M.slot_shapes().values()) * SMOLLM2_135M.num_layers
OTHER = other_params(SMOLLM2_135M)  # embeddings and norms


def spectra(seed=0):
    """Per-slot decaying spectra, steeper in some layers than in others."""
    gen = torch.Generator().manual_seed(seed)
    return [{slot: torch.rand(min(shape), generator=gen).sort(descending=True).values ** (1 + index % 6)
             for slot, shape in layer.items()} for index, layer in enumerate(SHAPES)]


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
@pytest.mark.parametrize("keep", [0.9, 0.8, 0.6, 0.3])
def test_fraction_plans_hit_the_budget_within_1_percent_and_never_exceed_it(allocation, keep):
    plan = plan_ranks(SHAPES, keep=keep, allocation=allocation, spectra=spectra())
    budget = keep * SLOT_PARAMS
    assert 0.99 * budget <= plan.slot_params <= budget
    assert all(s.rank % 8 == 0 and s.rank < s.break_even for s in plan.slots)


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_target_parameter_count(allocation):
    plan = plan_ranks(SHAPES, target_params=100_000_000, other_params=OTHER,
                      allocation=allocation, spectra=spectra())
    assert 0.99e8 <= plan.params <= 1e8
    assert plan.dense_params == 134_515_008  # SmolLM2-135M's parameter count, as transformers reports it


def test_spectrum_allocation_gives_more_rank_where_energy_is_spread():
    plan = plan_ranks(SHAPES, keep=0.5, allocation="spectrum", spectra=spectra())
    # Layer 0 has the flattest spectra (exponent 1), layer 5 the steepest (exponent 6).
    assert plan.rank(0, "linear_fc1") > plan.rank(5, "linear_fc1")


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_a_later_stage_never_raises_a_rank(allocation):
    first = plan_ranks(SHAPES, keep=0.6, allocation=allocation, spectra=spectra(1))
    second = plan_ranks(SHAPES, keep=0.4, allocation=allocation, spectra=spectra(2),
                        max_ranks=first.layer_ranks())
    assert all(s.rank <= first.rank(s.layer, s.slot) for s in second.slots)
    assert 0.99 * 0.4 * SLOT_PARAMS <= second.slot_params <= 0.4 * SLOT_PARAMS
    # a slot already below one rank step of the next stage's (multiple=16) is kept there, never raised to it
    small = [layer | {"linear_proj": 8} for layer in first.layer_ranks()]
    third = plan_ranks(SHAPES, keep=0.3, allocation=allocation, spectra=spectra(2), max_ranks=small, multiple=16)
    assert all(third.rank(layer, "linear_proj") == 8 for layer in range(len(SHAPES)))


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_a_slot_too_small_to_factor_stays_dense_and_the_budget_still_holds(allocation):
    """16 x 16 breaks even at rank 8: no multiple of 8 factors it. A small share of the large slots
    (uniform: below rank 8 each) is floored at 8, the plan steps back to stay within its budget."""
    shapes = [{"linear_qkv": (16, 16), "linear_proj": (1024, 1024), "linear_fc1": (1024, 1024),
               "linear_fc2": (1024, 1024)}] * 2
    spectra = [{slot: torch.linspace(1, 0.01, min(shape)) for slot, shape in layer.items()} for layer in shapes]
    dense = sum(out * inp for layer in shapes for out, inp in layer.values())
    plan = plan_ranks(shapes, target_params=dense // 32, allocation=allocation, spectra=spectra)
    assert all(s.rank is None for s in plan.slots if s.slot == "linear_qkv")
    assert all(s.rank is not None and s.rank < s.break_even for s in plan.slots if s.slot != "linear_qkv")
    assert dense // 32 - 8 * 2048 < plan.params <= dense // 32


def test_explicit_ranks_keep_slots_at_or_above_break_even_dense():
    plan = plan_ranks(SHAPES, ranks={"linear_qkv": 360, "linear_fc1": 128})
    assert plan.rank(3, "linear_qkv") is None  # 960x576: r* = 360
    assert plan.rank(3, "linear_fc1") == 128
    assert plan.rank(3, "linear_proj") is None  # not asked for: dense
    assert "dense (r*=360)" in plan.table()


def test_explicit_ranks_of_a_factored_model_keep_the_slots_they_do_not_name_at_their_rank():
    """The control of a family whose parent is a member (``ranks={}``: no slot changes) keeps its ranks."""
    member = plan_ranks(SHAPES, keep=0.6).layer_ranks()
    assert plan_ranks(SHAPES, ranks={}, max_ranks=member).layer_ranks() == member
    lowered = plan_ranks(SHAPES, ranks={"linear_fc1": 64}, max_ranks=member)
    assert lowered.rank(3, "linear_fc1") == 64 and lowered.rank(3, "linear_proj") == member[3]["linear_proj"]


def test_a_factored_slot_below_one_rank_step_keeps_its_rank_when_a_budget_is_planned():
    """A slot too small for a rank of ``multiple`` below break-even is not planned; once factored (here by
    explicit ranks), it keeps its rank, as a plan can only lower one, and its parameters count as spent."""
    shapes = [{"linear_qkv": (8, 8), "linear_proj": (64, 64)}] * 2
    member = plan_ranks(shapes, ranks={"linear_qkv": 2, "linear_proj": 16}).layer_ranks()
    later = plan_ranks(shapes, keep=0.3, max_ranks=member)
    assert [layer["linear_qkv"] for layer in later.layer_ranks()] == [2, 2]
    assert later.slot_params <= int(0.3 * sum(out * inp for layer in shapes for out, inp in layer.values()))


def test_a_factored_slot_below_one_rank_step_counts_at_its_own_rank_in_the_smallest_plan():
    """A budget between rank ``multiple`` everywhere and the smaller ranks a factored model already has fits."""
    shapes = [{"linear_qkv": (64, 64), "linear_proj": (64, 64)}]
    plan = plan_ranks(shapes, keep=0.2, max_ranks=[{"linear_qkv": 4, "linear_proj": 24}])
    assert plan.layer_ranks() == [{"linear_qkv": 4, "linear_proj": 8}]


def test_a_factored_model_is_never_planned_above_its_ranks():
    """A budget the member already meets, or an explicit rank above its own, is refused: planning the member's
    own ranks instead would train the stage as a copy of its parent."""
    member = plan_ranks(SHAPES, keep=0.4).layer_ranks()
    with pytest.raises(ValueError, match=r"parameters is not below the factored model's [\d,]+: nothing to decompose "
                                         r"\(a plan can only lower its ranks\)"):
        plan_ranks(SHAPES, keep=0.7, max_ranks=member)
    with pytest.raises(ValueError, match=rf"ranks: linear_fc1=500 is above the rank {member[0]['linear_fc1']} layer 0's "
                                         "linear_fc1 has; a plan can only lower a rank"):
        plan_ranks(SHAPES, ranks={"linear_fc1": 500}, max_ranks=member)


def test_table_and_json_round_trip(tmp_path):
    plan = plan_ranks(SHAPES, keep=0.6, other_params=OTHER)
    rows = [line.split() for line in plan.table().splitlines()]
    assert ["0-29", "linear_qkv", "960x576", str(plan.rank(0, "linear_qkv"))] == rows[1][:4]
    assert rows[-1][:2] == ["model", f"{134_515_008:,}"]
    plan.save(tmp_path / "plan.json")
    assert RankPlan.from_json((tmp_path / "plan.json").read_text()) == plan
    assert json.loads(plan.to_json())["slots"][0] == {
        "layer": 0, "slot": "linear_qkv", "out_features": 960, "in_features": 576,
        "rank": plan.rank(0, "linear_qkv")}


@pytest.mark.parametrize("kwargs, message", [
    (dict(ranks={"linear_qkv": 0}), "rank 0 for linear_qkv must be a positive integer"),
    (dict(ranks={"q_proj": 8}), r"unknown slot name\(s\) \['q_proj'\]"),
    (dict(keep=1.2), r"keep=1.2 must be a fraction in \(0, 1\)"),
    (dict(keep=0.5, ranks={"linear_qkv": 8}),
     re.escape("give exactly one of ranks=, keep=, target_params= (got ranks={'linear_qkv': 8}, keep=0.5;")),
    (dict(target_params=1_000_000, other_params=OTHER), "is below the smallest plan"),
    (dict(target_params=200_000_000, other_params=OTHER), "is not below the dense model"),
    (dict(keep=0.5, allocation="greedy"), r"allocation='greedy' is not one of"),
    (dict(keep=0.5, allocation="spectrum"), "needs the slots' spectra"),
])
def test_impossible_requests_fail_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_ranks(SHAPES, **kwargs)
