import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

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


@pytest.fixture
def cluster_family(tmp_path):
    """``load(recipe)``: a Bridge family recipe whose parent, data and output are in ``tmp_path``
    (the parent LLaMA-2-7B's config.json without its weights and SmolLM2's tokenizer, the data empty .bin/.idx
    files: what ``plrd submit`` reads)."""
    from nemo_plrd.bridge.family import BridgeFamilyConfig
    from nemo_plrd.config import load_config
    from tiny_llama import copy_tokenizer

    (tmp_path / "hf").mkdir()
    shutil.copy(Path(__file__).parents[1] / "recipes" / "architectures" / "llama2-7b" / "config.json", tmp_path / "hf")
    copy_tokenizer(tmp_path / "hf")
    for suffix in (".bin", ".idx"):
        (tmp_path / f"corpus{suffix}").write_text("")

    def load(recipe: str) -> BridgeFamilyConfig:
        return load_config(BridgeFamilyConfig, Path(__file__).parents[1] / "recipes" / recipe, [
            f"parent={tmp_path / 'hf'}", f"output={tmp_path / 'family'}", f"blend=[[{tmp_path / 'corpus'}], null]"])

    return load


def _answered(capsys, call: Callable[[], object], args) -> subprocess.CompletedProcess:
    """``call()``'s exit status (its return value, or the code of a SystemExit: argparse's and ``run_script``'s
    refusals exit 2) and what it printed, as a subprocess's would be answered."""
    capsys.readouterr()  # what the test printed before
    try:
        status = call()
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, 1 if isinstance(status, str) else status or 0, out, err)  # as sys.exit


@pytest.fixture
def plrd_here(capsys):
    """``plrd_here(*args)``: the ``plrd`` command line run in this process, without a new interpreter importing
    torch and megatron again (seconds a call). What only a process shows (the console script's exit, a rank's
    failure under torchrun) is tested with real ones."""
    from nemo_plrd.cli import main

    return lambda *args: _answered(capsys, lambda: main([str(arg) for arg in args]), args)


@pytest.fixture
def script_here(capsys, monkeypatch):
    """``script_here(path, *args)``: ``python path args`` run in this process, for refusals that come before the
    script sets up its process group (a script that goes on to load a model is run as a process)."""

    def run(path: Path, *args) -> subprocess.CompletedProcess:
        argv = [str(path), *map(str, args)]
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            # run_path returns the script's globals, not a status: a script that ends without sys.exit exits 0
            return _answered(capsys, lambda: runpy.run_path(str(path), run_name="__main__") and None, argv)

    return run
