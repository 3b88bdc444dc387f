"""The sbatch script `plrd submit` renders, run as 2 nodes x 1 process on this machine.

bash runs the stage's script itself; `srun` and `scontrol` are stand-ins for the scheduler
(slurm_on_localhost/: the command once per node, every node this one), and the CPU stand-ins
reach every process through PYTHONPATH (cpu_site/), so the torchrun commands are the script's
own: two launchers in one c10d rendezvous train the stage, then the conversion, the HF export and
lm-eval run on one node, and the stage folder is renamed complete.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from nemo_plrd.assets import CORPORA, corpus_dataset
from nemo_plrd.bridge.family import BridgeFamilyConfig
from nemo_plrd.config import load_config
from nemo_plrd.evaluate import evaluate
from nemo_plrd.plan import RankPlan
from nemo_plrd.slurm import Cluster, render
from test_stage import ROOT, losses

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_the_rendered_stage_job_runs_on_two_nodes_and_completes_the_stage(tiny_parent, tmp_path):
    family = load_config(BridgeFamilyConfig, HERE / "tiny_family.yaml", [
        f"parent={tiny_parent}", f"output={tmp_path / 'family'}",
        f"blend=[[{corpus_dataset('shakespeare', tiny_parent)}], null]"])
    script = tmp_path / "stage1.sbatch"
    script.write_text(render(family, 0, Cluster(nodes=2, gpus_per_node=1, workdir=str(ROOT), port=free_port())))
    log = tmp_path / "srun.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAKE_SLURM_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "2",
           "PATH": os.pathsep.join([str(HERE / "slurm_on_localhost"), str(Path(sys.executable).parent),
                                    os.environ["PATH"]]),
           "PYTHONPATH": os.pathsep.join([str(HERE / "cpu_site"), str(HERE), str(HERE.parent)])}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    starts = log.read_text().splitlines()
    train = [line for line in starts if "recipes/run_plrd.py" in line]
    assert [line.split(":")[0] for line in train] == ["node 0", "node 1"]  # one launcher per node...
    assert "--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:" in train[0]  # ...in one rendezvous
    assert len(starts) == 5  # then convert, export, eval: one node each

    stage = family.stage_folder(0)
    assert stage.is_dir() and not Path(f"{stage}.partial").exists()
    iteration = stage / "bridge" / "iter_0000006"
    assert {p.name for p in iteration.glob("__*_0.distcp")} == {"__0_0.distcp", "__1_0.distcp"}  # two ranks saved
    assert sorted(losses(stage / "bridge")) == list(range(1, 7))
    plan = RankPlan.from_json((stage / "bridge" / "plrd_plan.json").read_text())
    assert 0.99 * 3_200_000 <= plan.params <= 3_200_000
    merged = transformers.AutoModelForCausalLM.from_pretrained(stage / "hf-merged")
    assert sum(p.numel() for p in merged.parameters()) == 3_232_064  # merged: the parent's shapes
    results = json.loads((stage / "eval" / "results.json").read_text())
    assert results["items"] == {"arc_easy": 4} and sorted(results["perplexity"]) == sorted(CORPORA)
    again = evaluate(stage / "hf-merged", tasks=(), perplexity_blocks=1)  # the stage's own export was scored
    assert results["perplexity"] == pytest.approx(again["perplexity"], rel=1e-6)
    assert "stage 1 complete" in result.stdout
    rerun = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "complete, nothing to do" in rerun.stdout
    assert len(log.read_text().splitlines()) == 5  # nothing started again
