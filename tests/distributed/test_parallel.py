"""Process-group housekeeping: rebuilding megatron's parallel state must not leak groups."""

import os

import pytest

from nemo_plrd.parallel import init_model_parallel


def live_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.parametrize("tp_size", [2], indirect=True)
def test_rebuilding_model_parallel_state_releases_the_old_groups(tp_size):
    """Each rebuild leaked megatron's ~17 groups with their transport threads (~50 threads a
    rebuild on gloo), and the TP tests, which rebuild for every TP size, slowed to a crawl."""
    init_model_parallel(tp_size)
    before = live_threads()
    for tp in (1, tp_size) * 3:
        init_model_parallel(tp)
    assert live_threads() <= before + 10
