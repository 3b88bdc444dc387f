"""Process-group housekeeping: rebuilding megatron's parallel state must not leak groups."""

import os

from nemo_plrd.parallel import init_model_parallel


def live_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_rebuilding_model_parallel_state_releases_the_old_groups():
    """Each rebuild leaked megatron's ~17 groups with their transport threads (~50 threads a
    rebuild on gloo), and the TP tests, which rebuild for every TP size, slowed to a crawl."""
    init_model_parallel(2)
    before = live_threads()
    for tp in (1, 2, 1, 2, 1, 2):
        init_model_parallel(tp)
    assert live_threads() <= before + 10
