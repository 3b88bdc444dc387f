"""Low-rank TP layers equal a dense F.linear(x, U @ V) in outputs and all gradients.

Run under `torchrun --nproc_per_node 2 -m pytest tests/distributed` for TP=2; plain pytest
runs the TP=1 cases. fp32 throughout; the tolerance covers summation-order differences.
"""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_plrd.layers import LowRankColumnParallelLinear, LowRankRowParallelLinear
from nemo_plrd.parallel import init_model_parallel
from tp_utils import tp_chunk, tp_gather

TOL = dict(rtol=1e-5, atol=1e-5)
SEQ, BATCH, IN, OUT, RANK = 6, 3, 64, 96, 7  # RANK=7: r need not divide the TP size


def build(slot: str, tp: int, sequence_parallel: bool, bias: bool):
    init_model_parallel(tp, seed=7)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=IN,
        num_attention_heads=4,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
    )
    common = dict(rank=RANK, config=config, bias=bias,
                  init_method=lambda w: torch.nn.init.normal_(w, std=0.2),
                  tp_group=parallel_state.get_tensor_model_parallel_group())
    if slot == "column":
        layer = LowRankColumnParallelLinear(IN, OUT, **common)
    else:
        layer = LowRankRowParallelLinear(IN, OUT, input_is_parallel=True, skip_bias_add=False,
                                         **common)
    with torch.no_grad():  # a non-zero bias so that its gradient path is exercised
        for p in layer.parameters():
            if p.dim() == 1:
                p.normal_()
    return config, layer


@pytest.mark.parametrize("tp_size, sequence_parallel", [(1, False), (2, False), (2, True)], indirect=["tp_size"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("slot", ["column", "row"])
def test_low_rank_layer_matches_dense(slot, tp_size, sequence_parallel, bias):
    config, layer = build(slot, tp_size, sequence_parallel, bias)
    sp = config.sequence_parallel
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(), module=layer
    )
    # Factors as full matrices: U (out x r) and V (r x in).
    if slot == "column":
        up_full = tp_gather(layer.up.weight.detach(), 0)
        down_full = layer.down.weight.detach()
        bias_full = tp_gather(layer.up.bias.detach(), 0) if bias else None
    else:
        up_full = layer.up.weight.detach()
        down_full = tp_gather(layer.down.weight.detach(), 1)
        bias_full = layer.up.bias.detach() if bias else None

    gen = torch.Generator().manual_seed(0)
    x_full = torch.randn(SEQ, BATCH, IN, generator=gen)
    dy_full = torch.randn(SEQ, BATCH, OUT, generator=gen)

    # Dense reference: y = x (U V)^T + b, with autograd on U, V, b and x.
    ref = {k: v.clone().requires_grad_() for k, v in
           dict(x=x_full, up=up_full, down=down_full).items()}
    if bias:
        ref["bias"] = bias_full.clone().requires_grad_()
    y_ref = F.linear(ref["x"], ref["up"] @ ref["down"], ref.get("bias"))
    (y_ref * dy_full).sum().backward()

    # What each rank feeds and gets back, as megatron lays it out.
    if slot == "column":
        x_local = tp_chunk(x_full, 0) if sp else x_full  # [s(/tp), b, in]
        local_out = lambda t: tp_chunk(t, 2)  # [s, b, out/tp]
        local_dx = (lambda t: tp_chunk(t, 0)) if sp else (lambda t: t)
    else:
        x_local = tp_chunk(x_full, 2)  # [s, b, in/tp]
        local_out = (lambda t: tp_chunk(t, 0)) if sp else (lambda t: t)  # [s(/tp), b, out]
        local_dx = lambda t: tp_chunk(t, 2)
    x_local = x_local.clone().requires_grad_()
    y, out_bias = model(x_local)
    assert out_bias is None
    (y * local_out(dy_full)).sum().backward()
    finalize_model_grads([model])

    torch.testing.assert_close(y, local_out(y_ref.detach()), **TOL)
    torch.testing.assert_close(x_local.grad, local_dx(ref["x"].grad), **TOL)
    if slot == "column":
        torch.testing.assert_close(layer.up.weight.main_grad, tp_chunk(ref["up"].grad, 0), **TOL)
        torch.testing.assert_close(layer.down.weight.main_grad, ref["down"].grad, **TOL)
        replicated = [layer.down.weight]
        if bias:
            torch.testing.assert_close(layer.up.bias.main_grad, tp_chunk(ref["bias"].grad, 0), **TOL)
    else:
        torch.testing.assert_close(layer.up.weight.main_grad, ref["up"].grad, **TOL)
        torch.testing.assert_close(layer.down.weight.main_grad, tp_chunk(ref["down"].grad, 1), **TOL)
        replicated = [layer.up.weight] + ([layer.up.bias] if bias else [])
        if bias:
            torch.testing.assert_close(layer.up.bias.main_grad, ref["bias"].grad, **TOL)
    # Replicated factors: the same gradient on every TP rank, bit for bit.
    for param in replicated:
        gathered = tp_gather(param.main_grad.unsqueeze(0), 0)
        assert all(torch.equal(g, gathered[0]) for g in gathered)


@pytest.mark.parametrize("layer", [LowRankColumnParallelLinear, LowRankRowParallelLinear])
@pytest.mark.parametrize("rank", [0, -3, 2.5, True, min(IN, OUT) + 1])
def test_invalid_rank_is_refused(rank, layer):
    init_model_parallel(1)
    config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=4,
                               use_cpu_initialization=True)
    with pytest.raises(ValueError, match=rf"rank={rank!r} is invalid for a {OUT}x{IN} slot"):
        layer(IN, OUT, rank=rank, config=config, init_method=torch.nn.init.zeros_, bias=True,
              **({"input_is_parallel": True, "skip_bias_add": False} if layer is LowRankRowParallelLinear else {}))


@pytest.mark.parametrize("tp_size", [2], indirect=True)
@pytest.mark.parametrize("slot", ["column", "row"])
def test_an_expert_layer_over_a_tp_group_is_refused(tp_size, slot):
    """megatron's expert linears leave their TP collectives to the dispatcher: the replicated factor's
    gradient would differ per rank, with nothing to reduce it."""
    init_model_parallel(tp_size)
    config = TransformerConfig(num_layers=1, hidden_size=IN, num_attention_heads=4, use_cpu_initialization=True,
                               tensor_model_parallel_size=tp_size)
    common = dict(rank=RANK, config=config, init_method=torch.nn.init.zeros_, bias=False, is_expert=True)
    with pytest.raises(ValueError, match="is_expert=True over a TP group of 2 is not supported"):
        if slot == "column":
            LowRankColumnParallelLinear(IN, OUT, **common)
        else:
            LowRankRowParallelLinear(IN, OUT, input_is_parallel=True, skip_bias_add=False, **common)
