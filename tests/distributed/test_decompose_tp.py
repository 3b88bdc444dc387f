"""Gather-free decomposition at TP=2 equals TP=1 (each rank holds one shard of W)."""

import pytest
import torch

from nemo_plrd.decompose import column_factors, column_retruncate, row_factors, row_retruncate
from nemo_plrd.parallel import init_model_parallel, tp_sum

from tp_utils import tp_chunk, tp_gather


def data():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 40, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 300, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 40, dtype=torch.float64)[:, None]
    return weight, x @ x.T / 300


@pytest.mark.parametrize("tp_size", [2], indirect=True)
@pytest.mark.parametrize("method", ["activation", "svd"])
def test_tp2_factors_equal_tp1(tp_size, method):
    init_model_parallel(tp_size)
    weight, cov = data()
    cov_or_none = cov if method == "activation" else None
    out_cov = weight @ cov @ weight.T if method == "activation" else None

    # Column slot: W sharded on out; up comes back sharded, down replicated.
    ref_up, ref_down = column_factors(weight, 12, input_cov=cov_or_none)
    up, down = column_factors(tp_chunk(weight, 0), 12, input_cov=cov_or_none, reduce=tp_sum)
    torch.testing.assert_close(tp_gather(up, 0) @ down, ref_up @ ref_down, rtol=1e-9, atol=1e-11)
    ref_new = column_retruncate(ref_up, ref_down, 5, input_cov=cov_or_none)
    new = column_retruncate(up, down, 5, input_cov=cov_or_none, reduce=tp_sum)
    torch.testing.assert_close(tp_gather(new[0], 0) @ new[1], ref_new[0] @ ref_new[1], rtol=1e-9, atol=1e-11)

    # Row slot: W sharded on in; down comes back sharded, up replicated.
    ref_up, ref_down = row_factors(weight, 12, output_cov=out_cov)
    up, down = row_factors(tp_chunk(weight, 1), 12, output_cov=out_cov, reduce=tp_sum)
    torch.testing.assert_close(up @ tp_gather(down, 1), ref_up @ ref_down, rtol=1e-9, atol=1e-11)
    latent = None if method == "svd" else ref_down @ cov @ ref_down.T
    ref_new = row_retruncate(ref_up, ref_down, 5, latent_cov=latent)
    new = row_retruncate(up, down, 5, latent_cov=latent, reduce=tp_sum)
    torch.testing.assert_close(new[0] @ tp_gather(new[1], 1), ref_new[0] @ ref_new[1], rtol=1e-9, atol=1e-11)
