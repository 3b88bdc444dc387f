"""The collective meter sees megatron's collectives, aliased imports included, at exact sizes."""

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import mappings

from nemo_plrd.comm import CollectiveMeter
from nemo_plrd.parallel import init_model_parallel


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
