"""The collective meter sees megatron's collectives, aliased imports included, at exact sizes; and
the property the low-rank layers exist for: every TP collective they issue carries [s,b,r]."""

import sys
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings

from nemo_plrd.comm import CollectiveMeter
from nemo_plrd.parallel import init_model_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from tp_comm import CASES, COLUMN_SLOTS, measure  # noqa: E402


@pytest.mark.parametrize("tp_size", [2], indirect=True)
def test_meter_counts_megatron_collectives_by_full_tensor_size(tp_size):
    init_model_parallel(tp_size)
    group = parallel_state.get_tensor_model_parallel_group()
    x = torch.randn(8, 3, 5)  # 480 bytes
    meter = CollectiveMeter()
    with meter.measure():
        mappings.reduce_from_tensor_model_parallel_region(x.clone())  # all_reduce: 480
        mappings.gather_from_sequence_parallel_region(x)  # all-gather via alias: 16x3x5 -> 960
        mappings.reduce_scatter_to_sequence_parallel_region(x.clone())  # input 480
    assert [(c.op, c.nbytes) for c in meter.calls] == [
        ("all_reduce", 480), ("all_gather_into_tensor", 960), ("reduce_scatter_tensor", 480)]
    assert meter.total_bytes(group) == 1920
    # Restored on exit: nothing more is counted.
    mappings.reduce_from_tensor_model_parallel_region(x.clone())
    assert len(meter.calls) == 3


@pytest.mark.parametrize("tp_size", [2], indirect=True)
def test_meter_reads_the_group_given_by_position_and_counts_list_collectives(tp_size):
    """Every argument by position (megatron's MoE paths pass lists of per-rank parts): the same group and
    the same full size as by keyword."""
    init_model_parallel(tp_size)
    group = parallel_state.get_tensor_model_parallel_group()
    x = torch.randn(4, 5)  # 80 bytes
    meter = CollectiveMeter()
    with meter.measure():
        torch.distributed.all_reduce(x.clone(), torch.distributed.ReduceOp.SUM, group)
        torch.distributed.all_gather([torch.empty_like(x) for _ in range(tp_size)], x, group)
        torch.distributed.reduce_scatter(torch.empty_like(x), [x.clone() for _ in range(tp_size)],
                                         torch.distributed.ReduceOp.SUM, group)
        torch.distributed.all_to_all_single(torch.empty_like(x), x, None, None, group)
    assert [(c.op, c.shape, c.nbytes) for c in meter.on(group)] == [
        ("all_reduce", (4, 5), 80), ("all_gather", (2, 4, 5), 160), ("reduce_scatter", (2, 4, 5), 160),
        ("all_to_all_single", (4, 5), 80)]


SMOLLM2_SLOTS = [case[1:] for case in CASES if case[0] == "SmolLM2-135M"]


@pytest.mark.parametrize("tp_size", [2], indirect=True)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["sp-off", "sp-on"])
@pytest.mark.parametrize("slot, out, inp, rank", SMOLLM2_SLOTS, ids=[c[0] for c in SMOLLM2_SLOTS])
def test_low_rank_slots_move_rank_sized_activations_only(slot, out, inp, rank, sequence_parallel, tp_size):
    """Every collective of a low-rank slot's forward+backward is [s,b,r] (or its SP shard), and the
    bytes are exactly r/in (column slots) or r/out (row slots) of the dense layer's. A collective of
    hidden size coming back (e.g. dx all-reduced on a column slot) fails both checks."""
    init_model_parallel(tp_size)
    group = parallel_state.get_tensor_model_parallel_group()
    dense = measure(slot, out, inp, None, sequence_parallel)[0].on(group)
    low_rank = measure(slot, out, inp, rank, sequence_parallel)[0].on(group)
    width = inp if slot in COLUMN_SLOTS else out
    assert dense and {c.shape[-1] for c in dense} == {width}  # the meter sees the dense layer's traffic
    assert low_rank and [c.shape[-1] for c in low_rank] == [rank] * len(low_rank), low_rank
    assert sum(c.nbytes for c in low_rank) * width == sum(c.nbytes for c in dense) * rank
