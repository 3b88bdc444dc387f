"""A PLRD family's plan from the parent's architecture alone (an HF ``config.json``: no weights, no data).

With uniform allocation a stage's ranks depend only on the slot shapes and the stage's budget,
so this is the plan each stage computes when it runs (``transform.plan_for``), stage k's ranks
capped by stage k-1's as there. Spectrum allocation spends the same budget by calibrated
energy; its totals match, its per-layer ranks are only known after calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from nemo_plrd.errors import InputError
from nemo_plrd.model import LlamaArch
from nemo_plrd.plan import BUDGET_KEYS, RankPlan, SlotPlan, plan_ranks
from nemo_plrd.report import format_table
from nemo_plrd.slots import SLOTS, break_even_rank


@dataclass(frozen=True)
class StagePlan:
    name: str
    plan: RankPlan
    tokens: int  # training tokens of the stage
    seq_length: int  # of its training sequences (attention FLOPs depend on it)


def other_params(arch: LlamaArch) -> int:
    """Parameters outside the slots: embeddings (and an untied output layer), RMSNorm weights, qkv biases."""
    qkv_out = arch.slot_shapes()["linear_qkv"][0]
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    norms = arch.hidden_size * (2 * arch.num_layers + 1)
    return embeddings + norms + (qkv_out * arch.num_layers if arch.qkv_bias else 0)


def parent_plan(arch: LlamaArch, ranks: Optional[Sequence[Mapping[str, Optional[int]]]] = None) -> RankPlan:
    """The parent as a plan: every slot dense, or at ``ranks`` (per layer, a PLRD checkpoint's)."""
    return RankPlan(tuple(SlotPlan(layer, slot, out, inp, ranks[layer][slot] if ranks else None)
                          for layer in range(arch.num_layers) for slot, (out, inp) in arch.slot_shapes().items()),
                    other_params(arch))


def plan_family(arch: LlamaArch, requests: Sequence[Mapping[str, Any]],
                parent: Optional[RankPlan] = None, name: Callable[[int], str] = "stage {}".format) -> list[RankPlan]:
    """One plan per stage; ``requests``: ``plan_ranks`` keywords (keep= / target_params= / ranks=, allocation=,
    multiple=), each stage's ranks capped by the previous stage's (the first's by ``parent``'s). A refused request
    is named by ``name(its number)`` and its budget."""
    plans, previous = [], parent or parent_plan(arch)
    for number, request in enumerate(requests, 1):
        try:
            plan = plan_ranks([arch.slot_shapes()] * arch.num_layers, other_params=previous.other_params,
                              max_ranks=previous.layer_ranks(),
                              **request | {"allocation": "uniform"})  # spectrum: same budget, ranks after calibration
        except InputError as error:
            budget = ", ".join(f"{key}={value}" for key, value in request.items() if key in BUDGET_KEYS)
            raise InputError(f"{name(number)} ({budget}): {error}") from None
        plans.append(plan)
        previous = plan
    return plans


def forward_flops_per_token(plan: RankPlan, arch: LlamaArch, seq_length: int) -> int:
    """Forward FLOPs per token: 2 per weight of every slot and of the output layer, plus the attention
    products (QK^T and AV: 4 x hidden per position of context, causal, so (seq_length + 1) / 2 positions
    on average). Training costs about 3x this (backward: twice the forward)."""
    attention = 2 * arch.num_layers * arch.hidden_size * (seq_length + 1)
    return 2 * (plan.slot_params + arch.vocab_size * arch.hidden_size) + attention


def family_table(arch: LlamaArch, stages: Sequence[StagePlan], parent: Optional[RankPlan] = None) -> str:
    """One row per member (the parent first): parameters, ranks per slot type with the break-even
    rank r* in the header, slots kept dense (rank at or above r*), forward FLOPs per token, tokens."""
    parent = parent or parent_plan(arch)
    shapes = arch.slot_shapes()
    header = ["member", "params", "of parent"] + [
        f"{slot.removeprefix('linear_')} {out}x{inp} (r*={break_even_rank(out, inp):.0f})"
        for slot, (out, inp) in shapes.items()] + [
        "dense slots", "GFLOP/token (fwd)", "train tokens"]
    seq_length = stages[0].seq_length if stages else arch.max_sequence_length
    rows = [_row("parent", parent, parent, arch, seq_length, "-")]
    rows += [_row(stage.name, stage.plan, parent, arch, stage.seq_length,
                  f"{stage.tokens / 1e6:,.1f}M" if stage.tokens >= 1e5 else f"{stage.tokens:,}")
             for stage in stages]
    return format_table(header, rows)


def _row(name: str, plan: RankPlan, parent: RankPlan, arch: LlamaArch, seq_length: int, tokens: str) -> tuple:
    return (name, f"{plan.params / 1e9:.3f}B", f"{plan.params / parent.params:.1%}",
            *(_ranks(plan, slot) for slot in SLOTS), f"{sum(s.rank is None for s in plan.slots)}/{len(plan.slots)}",
            f"{forward_flops_per_token(plan, arch, seq_length) / 1e9:.2f}", tokens)


def _ranks(plan: RankPlan, slot: str) -> str:
    ranks = {s.rank for s in plan.slots if s.slot == slot}
    if ranks == {None}:
        return "dense"
    numbers = sorted(r for r in ranks if r is not None)
    text = str(numbers[0]) if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"
    return text + (" (some dense)" if None in ranks else "")


def load_family(path: str, overrides: Sequence[str] = ()):
    """A family recipe: a Bridge family (``target_params`` and ``job``, run by ``plrd submit``) or a local one
    (``keep`` and ``stage``, run by ``recipes/family.py``), told apart by its keys."""
    from nemo_plrd.bridge.family import BridgeFamilyConfig
    from nemo_plrd.config import FamilyConfig, load_config, load_yaml

    cls = BridgeFamilyConfig if "target_params" in load_yaml(path) else FamilyConfig
    return load_config(cls, path, overrides)


def recipe_plan(family) -> tuple[LlamaArch, RankPlan, list[StagePlan]]:
    """The architecture, the parent's plan and each stage's, for a ``load_family`` recipe."""
    from nemo_plrd.bridge.family import BridgeFamilyConfig
    from nemo_plrd.checkpoint import describe_parent
    from nemo_plrd.config import EMBEDDED_PARENT
    from nemo_plrd.model import SMOLLM2_135M

    if isinstance(family, BridgeFamilyConfig):
        arch = family.arch()
        requests = [family.plan_request(index) for index in range(len(family.target_params))]
        tokens, seq_length = family.train_tokens()
        parent = parent_plan(arch)
        budgets = [(tokens, seq_length)] * len(requests)
    else:  # the embedded parent's architecture is known without building its asset
        arch, ranks, _ = (SMOLLM2_135M, None, None) if family.parent == EMBEDDED_PARENT else \
            describe_parent(family.parent)
        stages = [family.stage_config(index, family.parent, family.output) for index in range(len(family.keep))]
        requests = [stage.plrd.plan.request() for stage in stages]
        budgets = [(stage.train.tokens, stage.train.seq_length) for stage in stages]
        parent = parent_plan(arch, ranks)
    plans = plan_family(arch, requests, parent)
    names = [family.stage_name(index) for index in range(len(plans))]
    return arch, parent, [StagePlan(name, plan, tokens, seq_length)
                          for name, plan, (tokens, seq_length) in zip(names, plans, budgets)]
