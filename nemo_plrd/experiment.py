"""A Bridge family as a nemo-run ``Experiment`` on SLURM (``plrd submit --launcher nemo-run``).

The commands are ``nemo_plrd.slurm``'s; nemo-run renders the sbatch headers, submits, and
tracks the jobs under ``OUTPUT/launch/nemo-run``. Each stage is two tasks, as nemo-run runs a
task's script on every one of its nodes: training on all nodes (the c10d rendezvous), then
conversion, exports and lm-eval on one node. Each task depends on the one before it
(``afterok``, and ``--kill-on-invalid-dep=yes`` so a failure cancels the rest). Their job ids go
to ``OUTPUT/launch/jobs.json``, as ``plrd submit``'s own launcher records them, so a second
submission while they are queued or running is refused. Needs the
``slurm`` extra: ``pip install -e '.[slurm]'`` in the checkout.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from nemo_plrd.bridge.family import BridgeFamilyConfig
from nemo_plrd.errors import InputError
from nemo_plrd.slurm import (Cluster, completion, pending_stages, preamble, prepare_submission, record_jobs,
                             sole_submission, stage_steps, step_lines)


def stage_tasks(family: BridgeFamilyConfig, index: int, cluster: Cluster) -> list[tuple[str, int, str]]:
    """(task name, nodes, inline bash) of stage ``index``'s two tasks."""
    train, *finish = stage_steps(family, index, cluster)
    name = family.stage_name(index)
    head = preamble(family, index, cluster, rendezvous=False)  # HEAD_NODE comes with the executor's environment
    return [(f"{name}-train", cluster.nodes, "\n".join([*head, *step_lines([train], 1, lambda step: [])])),
            (f"{name}-finish", 1, "\n".join([*head, *step_lines(finish, 2, lambda step: []),
                                              *completion(family, index)]))]


@contextmanager
def stage_experiment(family: BridgeFamilyConfig, cluster: Cluster, dry_run: bool = False):
    """The nemo-run ``Experiment`` of the pending stages, their tasks added, inside its context."""
    try:
        import nemo_run as run
    except ImportError as error:
        raise InputError(f"--launcher nemo-run needs nemo-run: pip install -e '.[slurm]' in the "
                         f"nemo-plrd checkout ({error})") from None
    launch = Path(family.output).resolve() / "launch" / "nemo-run"
    if any(character.isspace() or character == "%" for character in str(launch)):
        raise InputError(f"output={family.output!r}: nemo-run writes the tasks' log and work folders under it into "
                         "sbatch and srun lines unquoted (and sbatch reads a % in a log path as a pattern), so its "
                         "path may hold no spaces or %; choose another output, or --launcher sbatch (whose scripts "
                         "quote every path)")
    prepare_submission(family, cluster, dry_run)
    executor = run.SlurmExecutor(  # no --account / --time unless given: the cluster's defaults, as sbatch's launcher
        account=cluster.account, job_name_prefix="plrd-", partition=cluster.partition, time=cluster.time,
        nodes=cluster.nodes, ntasks_per_node=1, gpus_per_node=cluster.gpus_per_node, exclusive=True,
        # the rendezvous host: nemo-run's script finds it on the batch host; the tasks run in the container,
        # which need not hold scontrol
        env_vars={"HEAD_NODE": f"${{{run.SlurmExecutor.HEAD_NODE_IP_VAR}}}"},
        container_image=cluster.container_image, container_mounts=list(cluster.container_mounts),
        additional_parameters={"kill_on_invalid_dep": "yes"},
        # the local tunnel's job dir is the experiments' own folder, so the scripts sbatch gets are the rendered ones
        tunnel=run.LocalTunnel(job_dir=str(launch / "experiments")), packager=run.Packager())
    with run.Experiment(f"plrd-{Path(family.output).name}", executor=executor, base_dir=str(launch),
                        log_level="WARN") as experiment:
        previous = None
        for index in pending_stages(family):
            for name, nodes, inline in stage_tasks(family, index, cluster):
                task_executor = executor.clone()
                task_executor.nodes = nodes
                previous = experiment.add(run.Script(inline=inline), executor=task_executor, name=name,
                                          dependencies=[previous] if previous else None)
        yield experiment


def submit_experiment(family: BridgeFamilyConfig, cluster: Cluster, dry_run: bool = False) -> None:
    """Launch (detached) or, in a dry run, print every task's sbatch script."""
    if not pending_stages(family):
        print(f"{family.output}: every stage is complete, nothing to submit")
        return
    if dry_run:
        output = Path(family.output)
        fresh = not output.exists()
        try:
            with stage_experiment(family, cluster, dry_run) as experiment:
                experiment.dryrun()
        finally:  # nemo-run makes its (empty) experiment folders as it starts: a dry run leaves no output
            if fresh and output.exists() and not any(path.is_file() for path in output.rglob("*")):
                shutil.rmtree(output)
        return
    with sole_submission(family), stage_experiment(family, cluster, dry_run) as experiment:
        try:
            experiment.run(detach=True)
        except Exception as error:  # nemo-run stops at the first task it fails to submit: the ones before it are queued
            queued = ", ".join(f"{name}: job {job}" for name, job in submitted_jobs(experiment).items())
            raise InputError(f"nemo-run failed to submit the family's tasks ({error})"
                             + (f"; submitted before it, and recorded: {queued}" if queued else "")) from error
        finally:  # however it ended (done, failed, Ctrl-C), what was submitted is queued: the next submit must see it
            record_jobs(family, submitted_jobs(experiment))


def submitted_jobs(experiment) -> dict[str, str]:
    """The SLURM job id of each task submitted, which ends its handle (``slurm_tunnel://nemo_run/ID``)."""
    return {job.id: job.handle.rsplit("/", 1)[-1] for job in experiment.jobs if job.handle}
