import pytest
import torch.distributed as dist


def world_size() -> int:
    """1 under plain pytest, 2 under `torchrun --nproc_per_node 2 -m pytest`."""
    from nemo_plrd.parallel import init_distributed

    init_distributed()
    return dist.get_world_size()


@pytest.fixture
def tp_size(request) -> int:
    """Parametrise a test with `tp_size`; TP sizes above the world size are skipped."""
    tp = request.param
    if tp > world_size():
        pytest.skip(f"TP={tp} needs `torchrun --nproc_per_node {tp}`")
    return tp
