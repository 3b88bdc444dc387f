"""megatron's datasets built by a group of ranks: rank 0 builds the index cache, the others read it."""

import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from filelock import FileLock
from torch.distributed.distributed_c10d import _set_pg_timeout

from nemo_plrd.assets import corpus, smollm2_135m
from nemo_plrd.data import gpt_datasets, index_cache, megatron_tokenizer, prepare_dataset
from nemo_plrd.parallel import rank0_decides

GROUP_TIMEOUT = timedelta(minutes=5)  # conftest's process_group


@contextmanager
def collective_timeout(timeout: timedelta):
    """The group's collectives bounded at ``timeout`` while the block runs (torch's test hook)."""
    _set_pg_timeout(timeout)
    try:
        yield
    finally:
        _set_pg_timeout(GROUP_TIMEOUT)


def test_ranks_wait_for_another_job_s_index_build_that_outlasts_a_collective_s_timeout(tmp_path_factory,
                                                                                       monkeypatch):
    """Rank 0 waits for another job building in the same index cache, and the other ranks with it, in short
    rounds, never in one collective: a build that outlasts the group's timeout (3 s here; torch's default is
    30 min) delays the job instead of failing it. Before, rank 1 timed out in megatron's barrier."""
    tokenizer, text = megatron_tokenizer(smollm2_135m()), corpus("shakespeare")["train"].read_text()
    folder = rank0_decides(lambda: str(tmp_path_factory.mktemp("index-build")))
    monkeypatch.setenv("PLRD_CACHE", folder)  # the index cache
    prefix = f"{folder}/plays"
    if dist.get_rank() == 0:
        prepare_dataset([text[i * 2000:(i + 1) * 2000] for i in range(20)], tokenizer, prefix)
    dist.barrier()
    held, building = threading.Event(), 5.0
    if dist.get_rank() == 0:  # another job's rank 0, building in the same cache
        lock = FileLock(index_cache([prefix]) / ".build.lock")

        def other_job() -> None:
            with lock:
                held.set()
                time.sleep(building)

        index_cache([prefix]).mkdir(parents=True)
        other = threading.Thread(target=other_job)
        other.start()
        held.wait()
    dist.barrier()
    start = time.monotonic()
    with collective_timeout(timedelta(seconds=3)):
        train = gpt_datasets(([prefix], None), "90,10,0", 32, [8, None, None], tokenizer)[0]
    assert time.monotonic() - start >= building - 1  # every rank waited for the other job, none timed out
    if dist.get_rank() == 0:
        other.join()
    tokens = torch.stack([torch.as_tensor(train[i]["tokens"]) for i in range(8)])
    gathered = [torch.empty_like(tokens) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tokens)
    assert all(torch.equal(gathered[0], other) for other in gathered[1:])  # the indices rank 0 built, read by all
