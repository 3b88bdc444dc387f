"""`plrd submit --launcher nemo-run`: nemo-run's real Experiment and SlurmExecutor, against a stand-in scheduler.

`sbatch`, `squeue`, `sacct` and `scontrol` on PATH record their arguments (sbatch keeps each
script and answers job ids 101, 102, ...): nemo-run renders, submits and polls exactly as on a cluster.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

from nemo_plrd.bridge.family import BridgeFamilyConfig
from nemo_plrd.experiment import stage_experiment, stage_tasks
from nemo_plrd.slurm import Cluster, render

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = Cluster(nodes=2, gpus_per_node=8, partition="batch", account="acct",
                  container_image="nvcr.io/nvidia/nemo:26.06", container_mounts=("/lustre:/lustre",), workdir=str(ROOT))


@pytest.fixture
def scheduler(tmp_path, monkeypatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
echo "$@" >> {tmp_path}/sbatch.log
n=$(wc -l < {tmp_path}/sbatch.log)
# the call numbered in tmp_path/fail-at is refused, as a real sbatch refuses a job
if [ -e {tmp_path}/fail-at ] && [ $n = $(cat {tmp_path}/fail-at) ]; then
  echo "sbatch: error: Batch job submission failed: Invalid qos specification" >&2; exit 1
fi
# during the call numbered in tmp_path/interrupt-at, the user presses Ctrl-C: SIGINT to `plrd submit` (its
# process, not the group, which holds pytest) and to this call
if [ -e {tmp_path}/interrupt-at ] && [ $n = $(cat {tmp_path}/interrupt-at) ]; then
  pid=$$
  while [ "$pid" -gt 1 ]; do
    pid=$(ps -o ppid= -p "$pid" | tr -d ' ')
    if tr '\\0' ' ' < /proc/$pid/cmdline | grep -q nemo_plrd.cli; then kill -INT "$pid"; break; fi
  done
  exit 130
fi
cp "${{@: -1}}" {tmp_path}/script-$n.sh  # the script as submitted
echo $((100 + n))
""")
    for tool in ("squeue", "sacct", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/bash\necho "{tool} $@" >> {tmp_path}/poll.log\n')
    # the jobs the scheduler still holds: the ids in tmp_path/queue (none if it is absent)
    (bin_dir / "squeue").write_text(f'#!/bin/bash\necho "squeue $@" >> {tmp_path}/poll.log\n'
                                    f'[ -e {tmp_path}/queue ] && cat {tmp_path}/queue\nexit 0\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "sbatch.log"


@pytest.fixture
def family(cluster_family) -> BridgeFamilyConfig:
    return cluster_family("mistral_7b_family.yaml")


def test_each_stage_is_a_training_task_on_every_node_then_a_finishing_task_each_after_the_one_before(family):
    family.stage_folder(0).mkdir(parents=True)  # complete: not submitted again
    with stage_experiment(family, CLUSTER) as experiment:
        jobs = experiment.jobs
        assert [job.id for job in jobs] == [f"{name}-{part}" for name in ("stage2-5.2b", "stage3-4.15b", "stage4-3.1b")
                                            for part in ("train", "finish")]
        assert [job.executor.nodes for job in jobs] == [2, 1] * 3
        assert all(job.executor.gpus_per_node == 8 and job.executor.ntasks_per_node == 1 for job in jobs)
        assert all(job.executor.container_image == "nvcr.io/nvidia/nemo:26.06" for job in jobs)
        assert all(job.executor.container_mounts == ["/lustre:/lustre"] for job in jobs)
        assert all(job.executor.additional_parameters == {"kill_on_invalid_dep": "yes"} for job in jobs)
        # the rendezvous host: found by nemo-run's script on the batch host, passed to the tasks' containers
        assert all(job.executor.env_vars == {"HEAD_NODE": "${head_node_ip}"} for job in jobs)
        assert not jobs[0].dependencies
        assert all(later.dependencies == [earlier.id] for earlier, later in zip(jobs, jobs[1:]))
    # The commands are the sbatch script's, less its srun prefixes.
    (_, _, train), (_, _, finish) = stage_tasks(family, 1, CLUSTER)
    assert "scontrol" not in train + finish and '"--rdzv-endpoint=${HEAD_NODE}:29500"' in train
    script = render(family, 1, CLUSTER).splitlines()
    guarded = [line for line in (train + "\n" + finish).splitlines() if " || " in line]
    assert len(guarded) == 5  # train; convert, two exports, eval
    for line in guarded:
        guard, command = line.split(" || ")
        assert any(s.startswith(f"{guard} || srun ") and s.endswith(f" {command}") for s in script), line


def answered(result: subprocess.CompletedProcess, status: Optional[int]) -> subprocess.CompletedProcess:
    """``result``, once its exit status is ``status`` (None: any failure)."""
    assert result.returncode != 0 if status is None else result.returncode == status, result.stderr[-3000:]
    return result


def plrd_process(*args: str, status: Optional[int] = 0) -> subprocess.CompletedProcess:
    """`plrd` as a user runs it, in a process of its own (one a Ctrl-C can reach)."""
    return answered(subprocess.run([sys.executable, "-m", "nemo_plrd.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=300), status)


@pytest.fixture
def plrd(plrd_here, monkeypatch) -> Callable[..., subprocess.CompletedProcess]:
    """``plrd(*args, status=0)``: the command line run in this process from the checkout, as `plrd_process` runs it
    without a new interpreter importing torch, megatron and nemo-run (a quarter of a minute a call). nemo-run's
    local tunnel reads stdin, which pytest's capture forbids: it gets an empty one, as the process does."""
    monkeypatch.chdir(ROOT)

    def run(*args: str, status: Optional[int] = 0) -> subprocess.CompletedProcess:
        with open(os.devnull) as empty, monkeypatch.context() as patch:
            patch.setattr(sys, "stdin", empty)
            return answered(plrd_here(*args), status)

    return run


def test_submitting_through_nemo_run_chains_the_jobs_with_afterok(family, scheduler, plrd):
    plrd("submit", "recipes/mistral_7b_family.yaml", "--nodes", "2", "--gpus-per-node", "8", "--account", "acct",
         "--launcher", "nemo-run", f"parent={family.parent}", f"output={family.output}",
         f"blend=[[{family.blend[0][0]}], null]")
    calls = scheduler.read_text().splitlines()
    assert len(calls) == 8 and calls[0].startswith("--requeue --parsable ") and "dependency" not in calls[0]
    for number, call in enumerate(calls[1:], 101):
        assert call.startswith(f"--requeue --parsable --dependency=afterok:{number} ")
    first = (scheduler.parent / "script-1.sh").read_text()
    for directive in ("--nodes=2", "--gpus-per-node=8", "--account=acct", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {directive}\n" in first


def test_a_second_submission_while_the_first_one_s_jobs_are_queued_is_refused_naming_them(family, scheduler, plrd):
    """Two chains would train the same stages into the same folders."""
    submit = ("submit", "recipes/mistral_7b_family.yaml", "--nodes", "2", "--gpus-per-node", "8", "--launcher",
              "nemo-run", f"parent={family.parent}", f"output={family.output}", f"blend=[[{family.blend[0][0]}], null]")
    plrd(*submit)
    recorded = json.loads((Path(family.output) / "launch" / "jobs.json").read_text())
    assert recorded == {f"{name}-{part}": str(job) for job, (name, part) in enumerate(
        ((family.stage_name(index), part) for index in range(4) for part in ("train", "finish")), 101)}
    (scheduler.parent / "queue").write_text("103\n104\n")  # stage 2 still held
    refused = plrd(*submit, status=2)
    assert "stage2-5.2b-train: job 103, stage2-5.2b-finish: job 104); wait for them" in refused.stderr
    assert len(scheduler.read_text().splitlines()) == 8  # nothing more submitted
    (scheduler.parent / "queue").unlink()  # the queue has emptied: submitted again
    plrd(*submit)
    assert len(scheduler.read_text().splitlines()) == 16


@pytest.mark.parametrize("stop", ["fail-at", "interrupt-at"])
def test_a_submission_stopped_midway_records_the_jobs_it_queued_so_the_next_is_refused(family, scheduler, plrd, stop):
    """nemo-run stops at the first task sbatch refuses, or where the user pressed Ctrl-C; the tasks queued
    before it are recorded as a whole submission's are, so resubmitting while they are held cannot start a
    second chain."""
    submit = ("submit", "recipes/mistral_7b_family.yaml", "--nodes", "2", "--gpus-per-node", "8", "--launcher",
              "nemo-run", f"parent={family.parent}", f"output={family.output}", f"blend=[[{family.blend[0][0]}], null]")
    (scheduler.parent / stop).write_text("3\n")
    stopped = plrd if stop == "fail-at" else plrd_process  # a Ctrl-C reaches a process
    failed = stopped(*submit, status=2 if stop == "fail-at" else None)  # Ctrl-C: invoke may turn it into an error
    if stop == "fail-at":
        assert "Invalid qos specification" in failed.stderr
        assert "submitted before it, and recorded: stage1-6.2b-train: job 101, stage1-6.2b-finish: job 102" in \
            failed.stderr
    assert json.loads((Path(family.output) / "launch" / "jobs.json").read_text()) == \
        {"stage1-6.2b-train": "101", "stage1-6.2b-finish": "102"}
    (scheduler.parent / "queue").write_text("101\n102\n")
    refused = plrd(*submit, status=2)
    assert "stage1-6.2b-train: job 101, stage1-6.2b-finish: job 102); wait for them" in refused.stderr
    assert len(scheduler.read_text().splitlines()) == 3  # nothing more submitted


def test_an_output_path_with_a_space_is_refused_as_nemo_run_does_not_quote_it(family, scheduler, plrd):
    refused = plrd("submit", "recipes/mistral_7b_family.yaml", "--nodes", "2", "--gpus-per-node", "8", "--launcher",
                   "nemo-run", "--dry-run", f"output={family.output}/my family", status=2)
    assert "/my family': nemo-run writes the tasks' log and work folders under it into sbatch and srun lines " \
           "unquoted" in refused.stderr
    assert not scheduler.exists() and not Path(family.output, "my family").exists()


def test_a_dry_run_submits_nothing(family, scheduler, plrd):
    printed = plrd("submit", "recipes/mistral_7b_family.yaml", "--nodes", "2", "--gpus-per-node", "8",
                   "--launcher", "nemo-run", "--dry-run", f"output={family.output}").stdout
    assert not scheduler.exists() and not Path(family.output).exists()
    assert printed.count("Generated by NeMo Run") == 8 and "#SBATCH --nodes=2" in printed
    assert "export HEAD_NODE=${head_node_ip}" in printed
    assert "--account" not in printed and "--time" not in printed  # not given: the cluster's defaults
