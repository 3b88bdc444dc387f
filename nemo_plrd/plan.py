"""Rank plans: which rank each slot of each layer gets at one PLRD stage.

A plan is asked for in one of three ways: explicit ranks per slot type, a fraction of the
slot parameters to keep, or a target total parameter count ("how big is this family
member"). The budget is spread across slots uniformly (every slot keeps the same fraction
of its own parameters, the paper's choice) or by spectrum (rank steps go greedily where they
keep the most of a slot's calibrated output energy per parameter, which minimises the summed
relative error of the slots; measured worse than uniform on SmolLM2, see BENCHMARKS.md). Ranks are
multiples of ``multiple``; a slot whose rank would reach the break-even rank
mn/(m+n) costs more factored than dense and stays dense, and the plan says so.
A fraction or target plan never exceeds its budget and lands within one rank step of it.
"""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from nemo_plrd.errors import InputError
from nemo_plrd.files import write_text_atomic
from nemo_plrd.report import format_table
from nemo_plrd.slots import SLOTS, break_even_rank, check_slot_names

Shape = tuple[int, int]  # (out, in)
ALLOCATIONS = ("uniform", "spectrum")


@dataclass(frozen=True)
class SlotPlan:
    layer: int
    slot: str
    out_features: int
    in_features: int
    rank: Optional[int]  # None: kept dense

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params(self) -> int:
        return self.dense_params if self.rank is None else self.rank * (self.out_features + self.in_features)

    @property
    def break_even(self) -> float:
        return break_even_rank(self.out_features, self.in_features)


@dataclass(frozen=True)
class RankPlan:
    slots: tuple[SlotPlan, ...]
    other_params: int = 0  # parameters outside the slots (embeddings, norms)

    @property
    def params(self) -> int:
        return self.other_params + sum(s.params for s in self.slots)

    @property
    def dense_params(self) -> int:
        return self.other_params + sum(s.dense_params for s in self.slots)

    @property
    def slot_params(self) -> int:
        return sum(s.params for s in self.slots)

    @property
    def num_layers(self) -> int:
        return max(s.layer for s in self.slots) + 1

    def layer_ranks(self) -> list[dict[str, Optional[int]]]:
        """One {slot: rank or None} per layer: what ``build_gpt`` and the layer spec take."""
        ranks: list[dict[str, Optional[int]]] = [{} for _ in range(self.num_layers)]
        for s in self.slots:
            ranks[s.layer][s.slot] = s.rank
        return ranks

    def rank(self, layer: int, slot: str) -> Optional[int]:
        return self.layer_ranks()[layer][slot]

    def table(self) -> str:
        """One row per run of consecutive layers with the same slot rank, then totals."""
        body = []
        for slot in SLOTS:
            run: list[SlotPlan] = []
            for s in sorted((s for s in self.slots if s.slot == slot), key=lambda s: s.layer):
                same = run and (s.layer, s.rank) == (run[-1].layer + 1, run[-1].rank)
                if run and not same:
                    body.append(_table_row(run))
                    run = []
                run.append(s)
            if run:
                body.append(_table_row(run))
        body.append(("", "slots", "", "", f"{self.dense_params - self.other_params:,}", f"{self.slot_params:,}"))
        body.append(("", "model", "", "", f"{self.dense_params:,}",
                     f"{self.params:,} ({self.params / self.dense_params:.1%})"))
        return format_table(("layers", "slot", "shape", "rank", "params before", "params after"), body)

    def to_json(self) -> str:
        return json.dumps({"other_params": self.other_params,
                           "slots": [asdict(s) for s in self.slots]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RankPlan":
        data = json.loads(text)
        return cls(tuple(SlotPlan(**s) for s in data["slots"]), data["other_params"])

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader never sees a half-written plan."""
        write_text_atomic(path, self.to_json())


def _table_row(run: list[SlotPlan]) -> tuple:
    first, last = run[0], run[-1]
    layers = f"{first.layer}" if first is last else f"{first.layer}-{last.layer}"
    rank = f"dense (r*={first.break_even:.0f})" if first.rank is None else first.rank
    return (layers, first.slot, f"{first.out_features}x{first.in_features}", rank,
            f"{sum(s.dense_params for s in run):,}", f"{sum(s.params for s in run):,}")


def _largest_rank_below_break_even(out: int, inp: int, multiple: int) -> int:
    return (math.ceil(break_even_rank(out, inp)) - 1) // multiple * multiple


def _energy_fraction(spectrum: torch.Tensor) -> torch.Tensor:
    """fraction[r] = share of the energy kept by the top-r directions (fraction[0] = 0)."""
    energy = spectrum.double().clamp_min(0)
    return torch.cat([energy.new_zeros(1), energy.cumsum(0) / energy.sum().clamp_min(1e-300)])


BUDGET_KEYS = ("ranks", "keep", "target_params")  # a plan request gives exactly one


def check_request(ranks: Optional[Mapping[str, int]], keep: Optional[float], target_params: Optional[int],
                  allocation: str = "uniform", multiple: int = 8) -> None:
    """What can be refused before any model exists (``plan_ranks`` and recipe configs call it)."""
    asked = {name: value for name, value in zip(BUDGET_KEYS, (ranks, keep, target_params)) if value is not None}
    if len(asked) != 1:  # keys written key=, so a config names them from the top (plrd.plan.keep=)
        got = ", ".join(f"{name}={value!r}" for name, value in asked.items()) or "none"
        raise InputError(f"give exactly one of {', '.join(f'{name}=' for name in BUDGET_KEYS)} (got {got}; "
                         "a null value, or an override ~KEY, unsets one a YAML file sets)")
    if not _is_int(multiple) or multiple < 1:
        raise InputError(f"multiple={multiple!r} must be a positive integer")
    if allocation not in ALLOCATIONS:
        raise InputError(f"allocation={allocation!r} is not one of {ALLOCATIONS}")
    if ranks is not None:
        try:
            check_slot_names(ranks)
        except InputError as error:
            raise InputError(f"ranks={ranks!r}: {error}") from None
        for slot, rank in ranks.items():
            if not _is_int(rank) or rank < 1:
                raise InputError(f"ranks={ranks!r}: rank {rank!r} for {slot} must be a positive integer")
    if keep is not None and not (isinstance(keep, (int, float)) and 0 < keep < 1):
        raise InputError(f"keep={keep!r} must be a fraction in (0, 1)")
    if target_params is not None and (not _is_int(target_params) or target_params < 1):
        raise InputError(f"target_params={target_params!r} must be a positive integer")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plan_ranks(
    shapes: Sequence[Mapping[str, Shape]],
    *,
    ranks: Optional[Mapping[str, int]] = None,
    keep: Optional[float] = None,
    target_params: Optional[int] = None,
    other_params: int = 0,
    allocation: str = "uniform",
    spectra: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
    max_ranks: Optional[Sequence[Mapping[str, Optional[int]]]] = None,
    multiple: int = 8,
) -> RankPlan:
    """Plan the ranks of every slot of every layer (``shapes``: one {slot: (out, in)} per layer).

    Exactly one of ``ranks`` (per slot type), ``keep`` (fraction of slot parameters) or
    ``target_params`` (whole model, ``other_params`` included). ``spectra`` (descending
    eigenvalues of each slot's output energy) is needed for ``allocation="spectrum"``.
    ``max_ranks`` (per layer, {slot: rank or None}): the current ranks of an already
    factored model, which a later stage can only lower; a slot ``ranks`` does not name keeps its own.
    """
    check_request(ranks, keep, target_params, allocation, multiple)
    for layer_shapes in shapes:
        check_slot_names(layer_shapes)
    cells = [(layer, slot, shape) for layer, layer_shapes in enumerate(shapes) for slot, shape in layer_shapes.items()]

    current = [max_ranks[layer].get(slot) if max_ranks is not None else None for layer, slot, _ in cells]
    if ranks is not None:
        slots = []
        for (layer, slot, (out, inp)), now in zip(cells, current):
            rank = ranks.get(slot, now)
            if now is not None and rank > now:
                raise InputError(f"ranks: {slot}={rank} is above the rank {now} layer {layer}'s {slot} has; a plan "
                                 "can only lower a rank")
            keep_dense = rank is None or (now is None and rank >= break_even_rank(out, inp))
            slots.append(SlotPlan(layer, slot, out, inp, None if keep_dense else rank))
        return RankPlan(tuple(slots), other_params)

    dense = sum(out * inp for _, _, (out, inp) in cells)
    if keep is not None:
        budget = int(keep * dense)
    else:
        budget = target_params - other_params
    costs = [out + inp for _, _, (out, inp) in cells]
    size = sum(out * inp if now is None else now * cost for now, cost, (_, _, (out, inp)) in zip(current, costs, cells))
    # a slot that no multiple of ``multiple`` factors below break-even stays as it is, paid for first: dense, or
    # in an already factored model at the rank it has (a plan can only lower a rank)
    caps = [_largest_rank_below_break_even(out, inp, multiple) for _, _, (out, inp) in cells]
    fixed = sum(out * inp if now is None else now * cost
                for cap, now, cost, (_, _, (out, inp)) in zip(caps, current, costs, cells) if cap < multiple)
    factored = [i for i, cap in enumerate(caps) if cap >= multiple]
    caps = [min(cap, now or cap) for cap, now in zip(caps, current)]  # below a factored slot's rank
    smallest = fixed + sum(min(multiple, caps[i]) * costs[i] for i in factored)
    if budget < smallest:
        raise InputError(
            f"the budget of {budget + other_params:,} parameters is below the smallest plan "
            f"(rank {multiple} in every slot, or its own rank where lower: {smallest + other_params:,})"
        )
    if budget >= size:
        dense_now = all(now is None for now in current)
        raise InputError(f"the budget of {budget + other_params:,} parameters is not below the "
                         f"{'dense' if dense_now else 'factored'} model's {size + other_params:,}: nothing to "
                         f"decompose{'' if dense_now else ' (a plan can only lower its ranks)'}")
    budget -= fixed

    if allocation == "uniform":
        share = budget / (dense - fixed)
        chosen = [min(cap, max(multiple, int(share * out * inp / (out + inp)) // multiple * multiple))
                  for cap, (_, _, (out, inp)) in zip(caps, cells)]
        value = lambda i, r: share * cells[i][2][0] * cells[i][2][1] / costs[i] - r  # rank deficit
    else:
        if spectra is None:
            raise InputError("allocation='spectrum' needs the slots' spectra (calibrate first)")
        fractions = [_energy_fraction(spectra[layer][slot]).tolist() for layer, slot, _ in cells]
        chosen = [min(multiple, cap) for cap in caps]  # a slot already below one rank step stays where it is

        def value(i: int, r: int) -> float:  # share of the slot's energy won per parameter
            fraction = fractions[i]
            top = min(r + multiple, len(fraction) - 1)
            return (fraction[top] - fraction[min(r, top)]) / (multiple * costs[i])

    # The floor at ``multiple`` can overshoot a small share: steps back where a rank is worth least.
    spent = sum(chosen[i] * costs[i] for i in factored)
    while spent > budget:
        i = min((i for i in factored if chosen[i] > multiple), key=lambda i: value(i, chosen[i] - multiple))
        chosen[i] -= multiple
        spent -= multiple * costs[i]
    # Spend what is left of the budget one rank step at a time, best value first. The
    # values fall as a slot's rank grows (descending spectra), so this greedy minimises
    # the summed relative error of the slots (spectrum) or the rank deficits (uniform).
    heap = [(-value(i, chosen[i]), i) for i in factored]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if chosen[i] + multiple > caps[i] or spent + multiple * costs[i] > budget:
            continue  # never affordable again: spending only grows
        chosen[i] += multiple
        spent += multiple * costs[i]
        heapq.heappush(heap, (-value(i, chosen[i]), i))
    slots = tuple(SlotPlan(layer, slot, out, inp, rank if i in factored else current[i])
                  for i, ((layer, slot, (out, inp)), rank) in enumerate(zip(cells, chosen)))
    return RankPlan(slots, other_params)
