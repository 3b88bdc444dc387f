"""The recipes: their configs (YAML + overrides, refused when bad), two real stages, a real family."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import safetensors.torch
import torch
import transformers
from filelock import FileLock

from nemo_plrd.config import DecomposeConfig, FamilyConfig, config_differences, field_defaults, load_config
from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.evaluate import evaluate
from nemo_plrd.parallel import init_distributed
from nemo_plrd.pipeline import DECOMPOSED, RECORDS, _family_untrained, _untrained, claim
from nemo_plrd.plan import RankPlan
from nemo_plrd.report import family_report, headline_perplexity, plot_family
from processes import kill_when
from tiny_llama import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "recipes" / "smollm2_135m.yaml"
FAMILY_YAML = ROOT / "recipes" / "smollm2_135m_family.yaml"


def config(tmp_path, *overrides: str) -> DecomposeConfig:
    return load_config(DecomposeConfig, YAML, [f"output={tmp_path / 'out'}", *overrides])


def test_a_family_trained_on_none_of_the_held_out_corpora_calls_its_headline_unseen(tmp_path, monkeypatch):
    """Trained on one's own prefixes, every held-out corpus is a genre the stages never read: the headline
    perplexity combines all of them and says so, in the table, its note and the plot."""
    for suffix in (".bin", ".idx"):  # a prepared dataset, as far as the config checks
        (tmp_path / f"mine{suffix}").write_text("")
    cfg = config(tmp_path, f"dataset.blend=[[{tmp_path / 'mine'}], null]", "eval.heldout=[news, kjv]")
    assert cfg.in_domain == []
    member = {"in_domain": cfg.in_domain, "parent_perplexity": {"news": 30.0, "kjv": 20.0},
              "decomposed_perplexity": {"news": 90.0, "kjv": 40.0}, "member_perplexity": {"news": 60.0, "kjv": 30.0},
              "parent_params": 100, "member_params": 60, "train_losses": [5.0, 4.0], "train_tokens": 1024,
              "heldout_tokens": 4088, "seconds": 1.0}
    family = dataclasses.replace(load_config(FamilyConfig, FAMILY_YAML, []), keep=[0.6], baselines=["control"],
                                 output=str(tmp_path / "f"))
    report = "\n".join(family_report(family, None, [member], {}, 1.0))
    header, parent_row, member_row = report.splitlines()[2:5]
    assert header.split() == ["model", "keep", "parameters", "trained", "on", "unseen", "ppl:", "decomposed",
                              "trained", "news", "(unseen)", "kjv", "(unseen)"]  # no control: no gap closed
    assert member_row.split()[-4:-2] == [f"{(90 * 40) ** 0.5:.2f}", f"{(60 * 30) ** 0.5:.2f}"]  # both corpora
    assert "unseen: over all of them (news, kjv), as the stages train on none" in report
    closed = []  # the figure, as plot_family hands it to pyplot to close once saved
    monkeypatch.setattr(plt, "close", closed.append)
    family.parent = str(tmp_path / "stage1-keep0.6" / "checkpoint")  # a member's, by name only: not read here
    plot_family(family, [member], {}, tmp_path / "family.png")
    assert (tmp_path / "family.png").stat().st_size > 0
    axes = closed[0].axes[0]
    assert axes.get_title() == "PLRD family of stage1-keep0.6"  # a member parent goes by its stage
    assert {text.get_text() for text in axes.get_legend().get_texts()} == {
        "unseen: parent, then each member after training", "unseen: each member right after its decomposition",
        "news (unseen genre), trained", "kjv (unseen genre), trained"}
    low, high = axes.get_ylim()  # 20 to 60: within a decade, no major tick; every minor one labelled (was: 20, 50)
    assert [label.get_text() for label in axes.yaxis.get_ticklabels(minor=True)
            if low <= label.get_position()[1] <= high] == ["20", "30", "40", "50", "60"]


def test_the_control_s_keep_is_its_parent_s_share_of_the_dense_linear_layers(tmp_path):
    """1 for an HF parent (and for a record written before the dense count was), a member's share for a member."""
    perplexity = {"shakespeare": 30.0}
    member = {"in_domain": ["shakespeare"], "parent_perplexity": perplexity, "decomposed_perplexity": perplexity,
              "member_perplexity": perplexity, "parent_params": 100_000_000, "member_params": 60_000_000,
              "train_losses": [],
              "heldout_tokens": 4088, "seconds": 1.0, "member_linear_params": 48, "dense_linear_params": 80}
    family = dataclasses.replace(load_config(FamilyConfig, FAMILY_YAML, []), keep=[0.4], baselines=["control"],
                                 output=str(tmp_path / "f"))
    for control, keep in ((member, "0.6"), ({**member, "dense_linear_params": 48}, "1"),
                          ({key: value for key, value in member.items() if key != "dense_linear_params"}, "1")):
        rows = "\n".join(family_report(family, None, [member], {"control": control}, 1.0)).splitlines()[3:6]
        assert [row.split()[:2] for row in rows] == [["parent", "100.0M"], ["control", keep], ["stage", "1"]]


def test_a_family_measured_without_held_out_perplexity_reports_no_perplexity(tmp_path):
    """eval.perplexity_blocks=0: neither columns of dashes nor a note about perplexity on 0 tokens."""
    member = {"in_domain": ["shakespeare"], "parent_perplexity": None, "decomposed_perplexity": None,
              "member_perplexity": None, "parent_params": 100_000_000, "member_params": 60_000_000,
              "member_linear_params": 48, "train_losses": [5.0], "train_tokens": 1024, "heldout_tokens": 0,
              "seconds": 1.0}
    family = dataclasses.replace(load_config(FamilyConfig, FAMILY_YAML, []), keep=[0.6], baselines=["control"],
                                 output=str(tmp_path / "f"))
    report = "\n".join(family_report(family, None, [member], {"control": member}, 1.0))
    assert report.splitlines()[2].split() == ["model", "keep", "parameters", "trained", "on"]
    assert "perplexity" not in report and "Gap closed" not in report and "Each stage trained on 1,024 tokens" in report


def test_a_record_written_before_a_setting_existed_reads_it_as_its_default(tmp_path):
    """A stage interrupted under an earlier nemo-plrd resumes under one with more settings (a family's
    stages too: each is one), unless the new setting is given another value than its default."""
    record = dataclasses.asdict(config(tmp_path))
    record.pop("export_dtype")  # written before the key existed
    for given, changed in (([], []), (["export_dtype=bfloat16"], ["export_dtype: 'float32' -> 'bfloat16'"])):
        now = config(tmp_path, *given)
        assert config_differences(record, dataclasses.asdict(now), field_defaults(type(now))) == changed


def test_the_shipped_config_loads_and_overrides_reach_nested_fields(tmp_path):
    cfg = config(tmp_path, "plrd.plan.keep=null", "plrd.plan.target_params=80000000",
                 "plrd.calibration.tokens=1024", "eval.tasks=[piqa]", "eval.limit=null")
    assert cfg.parent == "smollm2-135m" and cfg.output == str(tmp_path / "out")
    assert cfg.plrd.plan.request() == {"target_params": 80_000_000, "allocation": "uniform", "multiple": 8}
    assert cfg.plrd.calibration.tokens == 1024 and cfg.plrd.calibration.seq_length == 512
    assert (cfg.eval.tasks, cfg.eval.limit, cfg.export) == (["piqa"], None, ["factored", "merged"])
    assert config(tmp_path, "train.steps=0", "train.warmup_steps=4").train.steps == 0  # no training: any warm-up
    assert cfg.plrd.method == "activation" and cfg.plrd.ridge == 0.01


@pytest.mark.parametrize("overrides, message", [
    (["plrd.plan.kep=0.5"], r"unknown key(s) ['plrd.plan.kep']; allowed here: ['plrd.plan.keep', "),
    (["plrd.plan.keep=half"], "plrd.plan.keep='half' must be Optional[float]"),
    (["plrd.plan.keep=1.5"], "plrd.plan.keep=1.5 must be a fraction in (0, 1)"),
    (["plrd.plan.target_params=80000000"], "give exactly one of plrd.plan.ranks=, plrd.plan.keep=, "
                                           "plrd.plan.target_params= (got plrd.plan.keep=0.6, "
                                           "plrd.plan.target_params=80000000; a null value, or an override ~KEY"),
    (["~plrd.plan.keep"], "give exactly one of plrd.plan.ranks=, plrd.plan.keep=, plrd.plan.target_params= (got none"),
    (["plrd.plan.keep=null", "plrd.plan.ranks={linear_qkv: 64, attention: 8}"],
     "plrd.plan.ranks={'linear_qkv': 64, 'attention': 8}: unknown slot name(s) ['attention']"),
    (["plrd.plan.keep=null", "plrd.plan.ranks={linear_qkv: 0}"],
     "plrd.plan.ranks={'linear_qkv': 0}: rank 0 for linear_qkv must be a positive integer"),
    (["plrd.method=qr"], "plrd.method='qr' is not one of ('activation', 'svd')"),
    (["plrd.ridge=-1"], "plrd.ridge=-1 must be a number >= 0"),
    (["plrd.calibration.tokens=0"], "plrd.calibration.tokens=0 must be a positive integer"),
    (["train.steps=4", "train.warmup_steps=5"], "train.steps=4 and train.warmup_steps=5 must satisfy"),
    (["optimizer.lr=0"], "optimizer.lr=0 must be > 0"),
    (["optimizer.lr=fast"], "optimizer.lr='fast' must be Optional[float]"),
    (["optimizer.lr_typo=1e-3"], "unknown key(s) ['optimizer.lr_typo']; allowed here: ['optimizer.lr', 'optimizer.min_lr'"),
    (["optimizer.optimizer=lamb"], "optimizer.optimizer='lamb' is not one of ['adam', 'sgd']"),
    (["optimizer.use_distributed_optimizer=true"], "optimizer.use_distributed_optimizer=true needs Apex or "
                                                   "Transformer Engine"),  # neither is installed here
    (["ddp.use_distributed_optimizer=true"], "ddp.use_distributed_optimizer cannot be set: it follows optimizer."),
    (["ddp.bucket_sise=100"], "unknown key(s) ['ddp.bucket_sise']; allowed here: ['ddp.grad_reduce_in_fp32', "),
    (["ddp.overlap_grad_reduce=yes"], "ddp.overlap_grad_reduce='yes' must be bool"),
    (["+ddp.bucket_size=-1"], "ddp.bucket_size=-1 must be a positive number of parameters per gradient bucket"),
    (["+optimizer.adam_eps=0"], "optimizer.adam_eps=0 must be > 0"),  # unseen tokens' embedding rows: 0/0
    # what megatron's own loop does and a stage's does not: refused, not trained wrong
    (["+optimizer.loss_scale=1024"], "optimizer.loss_scale=1024 cannot be set: a stage's step does not scale"),
    (["+ddp.overlap_param_gather=true"], "ddp.overlap_param_gather=true: a stage saves right after its optimizer step"),
    (["+ddp.num_distributed_optimizer_instances=2"], "ddp.num_distributed_optimizer_instances=2 must be 1 here"),
    (["+ddp.use_megatron_fsdp=true"], "ddp.use_megatron_fsdp=true: a stage trains under megatron's "
                                      "DistributedDataParallel, not its FSDP"),
    (["optimizer.optimizer=sgd", "+optimizer.sgd_momentum=-1"], "optimizer.sgd_momentum=-1 must be >= 0"),
    (["+optimizer.use_precision_aware_optimizer=true"],  # megatron's own check, a bare assertion
     "optimizer: --use-precision-aware-optimizer only supported with distributed optimizer (optimizer.optimizer="),
    (["train.eval_iters=-1"], "train.eval_iters=-1 must be >= 0"),
    (["train.eval_interval=3"], "train.eval_interval=3 needs train.eval_iters > 0"),  # else no validation, silently
    (["train.steps=4", "train.eval_iters=1", "dataset.split='100,0,0'"],
     "train.eval_iters=1 needs a valid share in dataset.split='100,0,0' (or train.eval_iters=0 train.eval_interval=0)"),
    (["train.global_batch=6"], "train.global_batch=6 must be a multiple of train.micro_batch=4"),
    (["train.decay_style=step"], "train.decay_style='step' is not one of ['constant', 'linear', 'cosine', 'WSD']"),
    (["train.decay_style=WSD"], "train.wsd_decay_steps=None is set exactly when decay_style is WSD"),
    (["dataset.blend=[[/no/such/data], null]"], "dataset.blend: '/no/such/data' is not a megatron indexed dataset"),
    (["dataset.blend=[[shakespeare], [1, 2]]"], "dataset.blend=[['shakespeare'], [1, 2]] must be [prefixes, weights]"),
    (["dataset.blend=[[shakespeare, kjv], [1, inf]]"],  # megatron would normalise the weights to [0, nan]
     "dataset.blend=[['shakespeare', 'kjv'], [1, inf]] must be [prefixes, weights]: a list of dataset prefixes and "
     "null or one positive, finite weight per prefix"),
    (["dataset.blend=[[shakespeare, kjv, shakespeare], null]"], "dataset.blend=[['shakespeare', 'kjv', "
     "'shakespeare'], None] names ['shakespeare'] more than once: name each dataset once and give it a larger weight"),
    (["dataset.split='90,10'"], "dataset.split='90,10' must be three shares"),
    (["dataset.split=90,10,0"], "override 'dataset.split=90,10,0' is a sweep (a list of choices); quote a value "
                                "with commas, and on a command line quote that for the shell too: "
                                "\"dataset.split='90,10,0'\""),
    (["+plrd.no_such_key=1"], "unknown key(s) ['plrd.no_such_key']"),
    (["plrd.stage=abc"], "unknown key(s) ['plrd.stage']"),
    (["~plrd.plan"], "missing key(s) ['plrd.plan']"),
    (["train.steps=${train.no_such}"], f"{YAML} with the overrides: Interpolation key 'train.no_such' not found"),
    (["parallel.tensor_model_parallel_size=0"], "parallel.tensor_model_parallel_size=0 must be a positive integer"),
    (["parent=/no/such/model"], "parent='/no/such/model' is not a directory"),
    (["output=."], "output='.' must name a new folder"),
    (["export=[gguf]"], "export=['gguf'] must list distinct formats among ['merged', 'factored']"),
    (["export_dtype=fp16"], "export_dtype='fp16' is not one of ['float32', 'bfloat16', 'float16', 'parent']"),
    (["export=[]"], "eval.tasks=['arc_easy', 'arc_challenge', 'piqa', 'hellaswag', 'winogrande', 'boolq', 'mmlu'] needs an HF export"),
    (["eval.tasks=[lambada]"], "eval.tasks: unknown task(s) ['lambada']"),
    (["eval.tasks=[piqa, piqa]"], "eval.tasks=['piqa', 'piqa'] names a task twice"),
    (["plrd.calibration.tokens=1000"], "plrd.calibration.tokens=1000 must be a multiple of "
                                       "plrd.calibration.seq_length=512 (whole sequences)"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be a positive integer"),
    (["mixed_precision=fp16_mixed"], "mixed_precision='fp16_mixed' must be null (fp32) or one of ['bf16_mixed']"),
    (["+optimizer.bf16=true"], "optimizer.bf16 cannot be set: it follows mixed_precision"),
    (["eval.heldout=[shakespeare, poetry]"], "eval.heldout=['shakespeare', 'poetry'] must name distinct embedded "
                                             "corpora, one or more, of ['shakespeare', 'wikipedia', 'kjv', 'news']"),
    (["dataset.blend=[[shakespeare, poetry], null]"], "dataset.blend: 'poetry' is not a megatron indexed dataset"),
    (["plrd=0.5"], "plrd must be a mapping of keys to values, got 0.5"),
    ([f"output={ROOT / 'README.md' / 'run'}"], f"output='{ROOT / 'README.md' / 'run'}' cannot be made: "
                                               f"{ROOT / 'README.md'} is a file, not a folder"),
    (["plrd.plan"], "override 'plrd.plan' is not key=value (e.g. plrd.plan.keep=0.5): missing EQUAL"),
])
def test_bad_configs_are_refused_naming_the_value_and_what_is_allowed(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        config(tmp_path, *overrides)
    assert str(error.value).startswith(message)  # the key first, named from the top


def test_a_config_file_that_is_not_one_is_refused_naming_it(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (tmp_path / "broken.yaml").write_text("plrd: [")
    for path, error, message in ((tmp_path, InputError, f"config file {tmp_path} is a folder; give a YAML file"),
                                 (tmp_path / "missing.yaml", MissingInputError, "does not exist"),
                                 (tmp_path / "binary.yaml", InputError, "binary.yaml is not valid YAML"),
                                 (tmp_path / "broken.yaml", InputError, "broken.yaml is not valid YAML")):
        with pytest.raises(error, match=re.escape(message)):
            load_config(DecomposeConfig, path)


@pytest.mark.parametrize("typo, allowed, fixed", [
    ("optimizer.lr_typo=1e-3", "optimizer.adam_eps", ["optimizer.bf16", "optimizer.fp16"]),
    ("ddp.bucket_sise=100", "ddp.bucket_size", ["ddp.use_distributed_optimizer"]),
])
def test_an_unknown_key_s_allowed_list_leaves_out_the_keys_a_stage_sets_itself(tmp_path, typo, allowed, fixed):
    with pytest.raises(ValueError) as error:
        config(tmp_path, typo)
    listed = str(error.value).partition("allowed here: ")[2]
    assert repr(allowed) in listed and not [key for key in fixed if repr(key) in listed]




def test_the_baselines_train_the_parent_with_the_stages_settings(tmp_path):
    family = load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", "stage.train.steps=10",
                                                     "stage.train.loss=kd"])
    control, oneshot = (family.baseline_config(name, str(tmp_path)) for name in family.baselines)
    assert family.baselines == ["control", "one-shot"]
    assert control.parent == oneshot.parent == "smollm2-135m" and control.output == str(tmp_path / "control")
    assert control.plrd.plan.request() == {"ranks": {}, "allocation": "uniform", "multiple": 8}  # every slot kept
    assert (control.train.steps, oneshot.train.steps, oneshot.plrd.plan.keep) == (10, 30, 0.25)  # 3 stages x 10
    assert oneshot.output == str(tmp_path / "one-shot-keep0.25") and oneshot.train.teacher == "smollm2-135m"
    assert control.optimizer == family.stage_config(0, "smollm2-135m", str(tmp_path)).optimizer
    assert (control.train.loss, oneshot.train.loss) == ("lm", "kd")  # distilled from itself, the parent would not move
    with pytest.raises(ValueError, match=r"baselines=\['control', 'oneshot'\] must list distinct names of "
                                         r"\['control', 'one-shot'\]"):
        load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", "baselines=[control, oneshot]"])


@pytest.mark.parametrize("overrides, loss", [
    (["stage.train.teacher=previous"], "lm"),  # the control's own parent: the family's parent again
    (["stage.train.loss=lm+kd"], "lm+kd"),  # the LM term moves it; the KL to the parent holds it near
    (["stage.train.teacher=OTHER"], "kd"),  # a teacher that is not the parent teaches the control too
    (["parent=OTHER", "stage.train.teacher=OTHER/."], "lm"),  # the parent's directory spelled another way
])
def test_the_control_is_distilled_only_from_a_teacher_other_than_itself(tmp_path, overrides, loss):
    other = save_tiny_llama(tmp_path / "other")  # a model: a family plans its stages from its parent's config
    overrides = [override.replace("OTHER", str(other)) for override in overrides]
    family = load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", "stage.train.loss=kd", *overrides])
    assert family.baseline_config("control", str(tmp_path)).train.loss == loss


def test_a_family_distils_from_its_parent_or_from_the_previous_member(tmp_path):
    family = load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", "stage.train.loss=kd"])
    teachers = lambda family: [family.stage_config(i, "smollm2-135m", str(tmp_path)).train.teacher for i in range(3)]
    assert teachers(family) == ["smollm2-135m"] * 3  # the family's parent, for every stage
    family = load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", "stage.train.loss=kd",
                                                     "stage.train.teacher=previous"])
    assert teachers(family) == ["previous"] * 3  # each stage's own parent


def test_yaml_interpolations_resolve_after_the_hydra_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(YAML.read_text() + "train:\n  steps: 8\n  seq_length: ${plrd.calibration.seq_length}\n")
    cfg = load_config(DecomposeConfig, recipe, [f"output={tmp_path / 'out'}", "plrd.calibration.seq_length=128",
                                                "~eval.limit", "+ddp.grad_reduce_in_fp32=true"])
    assert (cfg.train.steps, cfg.train.seq_length, cfg.plrd.calibration.seq_length) == (8, 128, 128)
    assert cfg.eval.limit is None  # deleted: the dataclass default
    assert cfg.ddp_config().grad_reduce_in_fp32 and not cfg.ddp_config().use_distributed_optimizer


def test_the_family_config_sets_each_stage_and_reads_scientific_floats(tmp_path):
    cfg = load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", "stage.optimizer.lr=3e-4"])
    stages = [cfg.stage_config(i, f"{tmp_path}", f"{tmp_path / 'family.partial'}") for i in range(len(cfg.keep))]
    assert [s.plrd.plan.keep for s in stages] == cfg.keep == [0.6, 0.4, 0.25]
    assert [Path(s.output).name for s in stages] == ["stage1-keep0.6", "stage2-keep0.4", "stage3-keep0.25"]
    assert all(s.optimizer_config().lr == 3e-4 and s.train.steps > 0 and s.eval.tasks for s in stages)
    samples = stages[0].train.samples  # the stages read one stream, one after another; the baselines from its start
    assert [(s.train.first_sample, s.train.stream_samples) for s in stages] == [(i * samples, 3 * samples)
                                                                                 for i in range(3)]
    baselines = [cfg.baseline_config(name, f"{tmp_path / 'family.partial'}").train for name in ("control", "one-shot")]
    assert [(b.first_sample, b.stream_samples, b.samples) for b in baselines] == [(0, 3 * samples, samples),
                                                                                   (0, 3 * samples, 3 * samples)]


@pytest.mark.parametrize("overrides, message", [
    (["keep=[0.4, 0.6]"], "keep=[0.4, 0.6] must list one or more fractions in (0, 1), strictly decreasing"),
    (["keep=[]"], "keep=[] must list one or more fractions"),
    (["keep=[0.6, 1.5]"], "keep=[0.6, 1.5] must list one or more fractions in (0, 1), strictly decreasing"),
    (["keep=[0.9, 0]"], "keep=[0.9, 0] must list one or more fractions in (0, 1)"),
    (["keep=[1.5]"], "keep=[1.5] must list one or more fractions in (0, 1)"),
    (["keep=[0.6, nan, 0.3]"], "keep=[0.6, nan, 0.3] must list one or more fractions in (0, 1)"),
    (["keep=[0.5]"], "baselines=['control', 'one-shot'] with keep=[0.5]: the one-shot member of a one-stage family "
                     "is its stage 1 again (the same decomposition, trained on the same samples); leave one-shot out "
                     "(baselines=['control'])"),
    (["output=runs/.."], "output='runs/..' must name a new folder"),
    (["stage.plrd.plan.keep=0.5"], "stage.plrd.plan.keep cannot be set: the family sets each stage's"),
    (["stage.output=x"], "stage.output cannot be set"),
    (["+stage.train.first_sample=8"], "stage.train.first_sample cannot be set: the family sets"),
    (["stage.train.stepz=3"], "unknown key(s) ['stage.train.stepz']"),
    # every stage's value checks name the key as typed: under stage.
    (["stage.train.steps=-1"], "stage.train.steps=-1 and stage.train.warmup_steps=4 must satisfy"),
    (["+stage.optimizer.lrr=1"], "unknown key(s) ['stage.optimizer.lrr']; allowed here: ['stage.optimizer.lr', "),
    (["stage.train.eval_iters=0"], "stage.train.eval_interval=12 needs stage.train.eval_iters > 0"),
    (["stage.optimizer.use_distributed_optimizer=true"],  # the key named from the top, not the word in the prose
     "stage.optimizer.use_distributed_optimizer=true needs Apex or Transformer Engine: without them megatron-core's "
     "distributed optimizer cannot"),
    (["stage.train.global_batch=6"], "stage.train.global_batch=6 must be a multiple of stage.train.micro_batch=4"),
    (["stage.optimizer.lr=fast"], "stage.optimizer.lr='fast' must be Optional[float]"),
    (["stage.plrd.ridge=-1"], "stage.plrd.ridge=-1 must be a number >= 0"),
    (["stage.plrd.calibration.tokens=0"], "stage.plrd.calibration.tokens=0 must be a positive integer"),
    (["stage.optimizer.lr=0"], "stage.optimizer.lr=0 must be > 0 and stage.optimizer.min_lr=1e-05 in [0, lr]"),
    (["stage.export=[gguf]"], "stage.export=['gguf'] must list distinct formats"),
    (["stage.export_dtype=int8"], "stage.export_dtype='int8' is not one of"),
    (["stage.eval.tasks=[arc]"], "stage.eval.tasks: unknown task(s) ['arc']"),
    (["+stage.ddp.use_distributed_optimizer=true"], "stage.ddp.use_distributed_optimizer cannot be set"),
    (["stage.dataset.blend=[[/no/such/data], null]"], "stage.dataset.blend: '/no/such/data' is not a megatron"),
    # a later stage's budget, from the architecture: refused before stage 1 trains, not when stage 3 starts
    (["keep=[0.6, 0.4, 0.0001]"], "stage 3 (keep=0.0001): the budget of 28,357,304 parameters is below the smallest"),
    (["stage.optimizer.adam_beta1=2"], "stage.optimizer.adam_beta1=2 must be in [0, 1)"),
    (["stage.optimizer.clip_grad=-1"], "stage.optimizer.clip_grad=-1 must be >= 0 (0: no clipping)"),
    (["stage.optimizer.lr=inf"], "stage.optimizer.lr=inf must be > 0 and"),
    (["stage.dataset.random_seed=-1"], "stage.dataset.random_seed=-1 must be in [0, 2**32 - 1]"),
    (["stage.plrd.ridge=inf"], "stage.plrd.ridge=inf must be a number >= 0"),
])
def test_bad_family_configs_are_refused_before_any_stage_runs(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", *overrides])
    assert str(error.value).startswith(message)  # the key first, named from the top


def recipe(*args, nproc: int = 1, name: str = "decompose", config: Path = YAML) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, str(ROOT / "recipes" / f"{name}.py"), "--config", str(config), *map(str, args)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


def held_out(model: Path) -> dict[str, float]:
    """The HF model's held-out perplexity over the blocks the tests' stages measure (2 per corpus)."""
    return evaluate(model, tasks=(), perplexity_blocks=2)["perplexity"]


@pytest.fixture
def recipe_here(script_here):
    """``recipe(*args)`` at one process, run in this one: for runs refused before any work (a new interpreter
    importing torch and megatron takes ten seconds and more) and a finished output's rerun. A run that works, and
    a refusal only another process can meet (a held lock, a failed rank), are tested with real processes."""
    return lambda *args, name="decompose", config=YAML: script_here(ROOT / "recipes" / f"{name}.py", "--config",
                                                                   config, *args)


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer, so the calibration and eval text is real."""
    return save_tiny_llama(tmp_path_factory.mktemp("parent"))


def test_two_stages_tp2_then_tp1_export_evaluate_and_agree(tiny_parent, tmp_path):
    small = ["plrd.calibration.tokens=512", "plrd.calibration.seq_length=128", "eval.perplexity_blocks=2"]
    first = tmp_path / "stage1"
    run = recipe(f"parent={tiny_parent}", f"output={first}", "plrd.plan.keep=0.6", "eval.tasks=[arc_easy]",
                 "eval.limit=3", "parallel.tensor_model_parallel_size=2", *small, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in first.iterdir()) == ["checkpoint", "config.json", "decomposed.json", "eval",
                                                       "hf-factored", "hf-merged", "plan.json", "plan.txt",
                                                       "summary.json", "summary.md"]
    assert not Path(f"{first}.partial").exists()
    bars = [line for line in run.stderr.replace("\r", "\n").splitlines()
            if line.startswith("held-out perplexity: 100%")]  # rank 0's: the parent's, the decomposed model's
    assert len(bars) >= 2 and all("tok/s]" in bar for bar in bars)
    plan = RankPlan.from_json((first / "plan.json").read_text())
    summary = json.loads((first / "summary.json").read_text())
    assert summary["tp"] == 2 and summary["member_params"] == plan.params < summary["parent_params"]

    factored = transformers.AutoModelForCausalLM.from_pretrained(first / "hf-factored", trust_remote_code=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(first / "hf-merged")
    assert factored.num_parameters() == plan.params
    tokens = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(factored(tokens).logits, merged(tokens).logits, rtol=0, atol=1e-4)
    # The held-out perplexity of the TP=2 megatron model is the HF export's, so lm-eval's run, which scored the
    # export, measured none again.
    results = json.loads((first / "eval" / "results.json").read_text())
    assert results["model"] == str(first / "hf-factored")  # where it is now, not where it was evaluated
    assert results["perplexity"] == {} and held_out(first / "hf-factored") == pytest.approx(
        summary["member_perplexity"], rel=1e-4)
    assert results["items"] == {"arc_easy": 3}  # eval.limit (the scores come from the model: test_evaluate.py)

    second = tmp_path / "stage2"  # the next stage: the checkpoint re-truncated, at TP=1
    run = recipe(f"parent={first / 'checkpoint'}", f"output={second}", "plrd.plan.keep=0.3", "export=[factored]",
                 "eval.tasks=[]", *small)
    assert run.returncode == 0, run.stderr[-3000:]
    lower = RankPlan.from_json((second / "plan.json").read_text())
    pairs = [(a.rank, b.rank) for a, b in zip(plan.slots, lower.slots)]
    assert all(b <= a for a, b in pairs) and any(b < a for a, b in pairs)
    assert json.loads((second / "checkpoint" / "plrd.json").read_text())["ranks"] == lower.layer_ranks()
    summary2 = json.loads((second / "summary.json").read_text())
    assert summary2["parent_params"] == plan.params and summary2["parent_perplexity"] == pytest.approx(
        summary["member_perplexity"], rel=1e-4)  # stage 2 starts from exactly what stage 1 wrote
    assert "wrote" in run.stdout and "held-out perplexity" in (second / "summary.md").read_text()

    control = tmp_path / "control"  # a family's control when its parent is a member: no slot changes rank
    run = recipe(f"parent={first / 'checkpoint'}", f"output={control}", "plrd.plan.keep=null", "plrd.plan.ranks={}",
                 "export=[]", "eval.tasks=[]", *small)
    assert run.returncode == 0, run.stderr[-3000:]
    summary3 = json.loads((control / "summary.json").read_text())
    assert summary3["member_params"] == summary3["parent_params"] == plan.params
    assert summary3["calibration_tokens"] == 0  # nothing calibrated: every slot kept stage 1's rank
    assert json.loads((control / "checkpoint" / "plrd.json").read_text())["ranks"] == plan.layer_ranks()


def test_the_recipe_refuses_bad_input_and_writes_nothing(tmp_path, recipe_here):
    out = tmp_path / "out"
    run = recipe_here(f"output={out}", "plrd.plan.keep=2")
    assert run.returncode == 2 and "plrd.plan.keep=2 must be a fraction in (0, 1)" in run.stderr, run.stderr[-2000:]
    assert not out.exists() and not Path(f"{out}.partial").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="another user is refused earlier: /proc is not writable to it")
def test_an_output_the_file_system_will_not_make_is_refused_naming_it(recipe_here):
    """/proc lets root past the configs' check (writable to it) but makes no folder: refused in one line, as a read-only
    mount would be (before: a traceback from rank 0's mkdir, the other ranks left waiting)."""
    run = recipe_here("output=/proc/plrd-stage")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "output='/proc/plrd-stage' cannot be made: No such file or directory (/proc/plrd-stage.partial)" in run.stderr


def test_a_budget_no_plan_fits_is_refused_naming_it_before_the_output_is_claimed(tiny_parent, tmp_path, recipe_here):
    """Planned from the parent's shapes before any work (before: after OUTPUT.partial and its config.json were
    written, and without the key)."""
    out = tmp_path / "out"
    run = recipe_here(f"parent={tiny_parent}", f"output={out}", "plrd.plan.keep=null", "plrd.plan.target_params=5")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "plrd.plan (target_params=5): the budget of 5 parameters is below the smallest plan" in run.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_second_run_of_an_output_being_written_is_refused_and_touches_nothing(tiny_parent, tmp_path):
    """A double launch, or a job requeued while the first still runs: refused while the first holds
    OUTPUT.partial's lock, instead of deleting its checkpoints under it."""
    out = tmp_path / "out"
    partial = Path(f"{out}.partial")
    partial.mkdir()
    (partial / "work").write_text("the first run's")
    with FileLock(partial / ".lock"):  # the first run, still writing
        run = recipe(f"parent={tiny_parent}", f"output={out}", *TRAINED)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"output={str(out)!r} is being written by another run" in run.stderr
    assert sorted(p.name for p in partial.iterdir()) == [".lock", "work"] and not out.exists()


def test_a_global_batch_that_does_not_split_over_the_data_parallel_ranks_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    run = recipe(f"output={out}", "train.steps=2", "train.micro_batch=4", "train.global_batch=4", nproc=2)
    assert run.returncode != 0
    assert "train.global_batch=4 is not a multiple of train.micro_batch=4 x the data-parallel size 2" in run.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_two_stage_family_trains_each_member_at_tp2_and_reports_it(tiny_parent, tmp_path):
    """Each stage trains (the exported model lm-eval scored is the trained one: its perplexity is the trained
    member's), stage 2 starts from stage 1's trained checkpoint, and the report and plot are written."""
    out = tmp_path / "family"
    run = recipe(f"parent={tiny_parent}", f"output={out}", "keep=[0.6, 0.3]", "baselines=[control, one-shot]",
                 "stage.plrd.calibration.tokens=512",
                 "stage.plrd.calibration.seq_length=128", "stage.train.steps=6", "stage.train.seq_length=64",
                 "stage.optimizer.lr=1e-3", "stage.train.warmup_steps=1", "stage.export=[factored]",
                 "stage.parallel.tensor_model_parallel_size=2",
                 "stage.eval.tasks=[arc_easy]", "stage.eval.limit=3", "stage.eval.perplexity_blocks=2",
                 nproc=2, name="family", config=FAMILY_YAML)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "control", "eval", "family.json", "family.md",
                                                     "family.png", "one-shot-keep0.3", "stage1-keep0.6", "stage2-keep0.3"]
    assert not Path(f"{out}.partial").exists()
    family = json.loads((out / "family.json").read_text())
    members, control, oneshot = family["members"], family["baselines"]["control"], family["baselines"]["one-shot"]
    # the parent row: the HF parent lm-eval scored measures what the megatron import measured
    assert family["parent_eval"]["model"] == str(tiny_parent)
    assert held_out(tiny_parent) == pytest.approx(members[0]["parent_perplexity"], rel=1e-4)
    assert set(members[0]["parent_perplexity"]) == {"shakespeare", "wikipedia", "kjv", "news"}
    for member in members + [oneshot]:
        assert member["tp"] == 2 and member["in_domain"] == ["shakespeare", "wikipedia", "kjv"]
        assert headline_perplexity(member, "member_perplexity") < headline_perplexity(member, "decomposed_perplexity")  # training helped
        assert held_out(member["eval"]["model"]) == pytest.approx(member["member_perplexity"], rel=1e-4)
    evaluations = [family["parent_eval"]] + [m["eval"] for m in members + [control, oneshot]]
    assert all(e["perplexity"] == {} and e["items"] == {"arc_easy": 3} for e in evaluations)  # measured once, above
    first, second = members
    assert [len(m["train_losses"]) for m in (first, second, control, oneshot)] == [6, 6, 6, 12]  # one-shot: 2 x 6
    # a stage's parent is the member the stage before measured (not measured again); its export, the
    # HF model lm-eval loads, measures the same (above)
    assert second["parent_perplexity"] == first["member_perplexity"]
    assert control["parent_perplexity"] == oneshot["parent_perplexity"] == first["parent_perplexity"]
    assert second["parent"] == str(out / "stage1-keep0.6" / "checkpoint")  # the path after the final rename
    # every record names the paths as they are now (they were written in OUTPUT.partial); config.json keeps
    # the settings the run was given
    records = [path for name in RECORDS for path in out.rglob(name)]
    assert len(records) >= 15 and not [path for path in records if ".partial" in path.read_text()]
    for member in members + [control, oneshot]:
        assert all(Path(path).is_dir() for path in (member["parent"], member["hf_source"], member["eval"]["model"]))
    assert second["member_params"] < first["member_params"] < first["parent_params"]
    assert second["parent_params"] == first["member_params"]  # counted on the model stage 2 loaded: stage 1's
    # the control: the parent as it is (no calibration, no slot changed), then trained like a stage
    assert control["parent"] == oneshot["parent"] == str(tiny_parent)
    assert control["member_params"] == control["parent_params"] == first["parent_params"]
    assert control["calibration_tokens"] == 0
    # the one-shot member: the last stage's size from the parent in one step (its plan is not capped by
    # stage 1's ranks, so it may land a rank step away)
    assert oneshot["member_params"] == pytest.approx(second["member_params"], rel=0.02)
    report = (out / "family.md").read_text()
    assert "stage 2" in report and f"{headline_perplexity(second, 'member_perplexity'):.2f}" in report
    gap = lambda m: (headline_perplexity(m, "decomposed_perplexity") - headline_perplexity(m, "member_perplexity")) / (
        headline_perplexity(m, "decomposed_perplexity") - headline_perplexity(control, "member_perplexity"))
    rows = {" ".join(line.split()[:2]): line for line in report.split("\n\n")[1].splitlines()}  # perplexity table
    assert f" {gap(second):.0%} " in rows["stage 2"] and f" {gap(oneshot):.0%} " in rows["one-shot 0.3"]
    assert "news (unseen)" in report and " ± " in report and "items per task: arc_easy 3." in report
    took = report.splitlines()[-1]  # where the time went, by model, in the order of the table
    assert took.startswith("Took ") and re.findall(r"(control|stage \d|one-shot) \d+ (?:s|min|h)\b", took) == [
        "control", "stage 1", "stage 2", "one-shot"], took
    assert plt.imread(out / "family.png").shape[2] in (3, 4)


# A stage that trains: 6 steps of 4 sequences (2 per micro-batch), a checkpoint every 2 steps.
TRAINED = ["plrd.calibration.tokens=512", "plrd.calibration.seq_length=128", "eval.perplexity_blocks=2",
           "eval.tasks=[]", "export=[merged]", "train.steps=6", "train.seq_length=64", "train.micro_batch=2",
           "train.global_batch=4", "train.save_interval=2", "train.warmup_steps=1", "optimizer.lr=1e-3",
           "train.eval_interval=3", "train.eval_iters=1"]


def launch(*args, nproc: int, name: str = "decompose", config: Path = YAML) -> subprocess.Popen:
    """The recipe in a process group of its own, so that a kill reaches every rank and its helpers."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             str(ROOT / "recipes" / f"{name}.py"), "--config", str(config), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_steps(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def merged_weights(stage: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(stage / "hf-merged" / "model.safetensors")


@pytest.fixture(scope="module")
def trained_stage(tiny_parent, tmp_path_factory) -> Path:
    """The uninterrupted reference: TP=1 x DP=2."""
    out = tmp_path_factory.mktemp("reference") / "stage"
    run = recipe(f"parent={tiny_parent}", f"output={out}", *TRAINED, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def killed_at_step_3(tiny_parent, out: Path, *settings: str) -> tuple[str, ...]:
    """The stage's arguments, once its run at DP=2 was sent SIGKILL with step 3 logged (the last save was at step 2)."""
    partial = Path(f"{out}.partial")
    args = (f"parent={tiny_parent}", f"output={out}", *settings)
    kill_when(launch(*args, nproc=2), lambda: logged_steps(partial / "metrics.jsonl") >= 3)
    assert not out.exists() and [p.name for p in (partial / "train").iterdir()] == ["iter_0000002"]
    return args


def assert_resumes_exactly(reference: Path, out: Path, args: tuple[str, ...]) -> None:
    """The killed stage's command again: the losses, validation losses, perplexity and every exported weight equal
    the uninterrupted run's, and it resumed rather than started again (a run started again would reach the same
    figures on CPU)."""
    partial = Path(f"{out}.partial")
    planned = (partial / "plan.json").stat().st_mtime_ns
    saved_rows = (partial / "metrics.jsonl").read_text().splitlines()[:2]  # steps 1-2, with their tokens/s
    run = recipe(*args, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "plan.json").stat().st_mtime_ns == planned  # not decomposed again
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == saved_rows  # steps 1-2 not trained again
    expected, resumed = (json.loads((s / "summary.json").read_text()) for s in (reference, out))
    assert len(resumed["train_losses"]) == 6 and resumed["train_losses"] == expected["train_losses"]
    assert [step for step, _ in resumed["valid_losses"]] == [3, 6] and resumed["valid_losses"] == expected["valid_losses"]
    assert resumed["member_perplexity"] == expected["member_perplexity"]
    reference, weights = merged_weights(reference), merged_weights(out)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


DISTILLED = [*TRAINED, "train.loss=kd", "parallel.tensor_model_parallel_size=2"]


@pytest.fixture(scope="module")
def distilled_stage(tiny_parent, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted distilled stage at TP=2 and what it printed."""
    out = tmp_path_factory.mktemp("distilled") / "kd"
    run = recipe(f"parent={tiny_parent}", f"output={out}", *DISTILLED, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run.stdout


def test_a_distilled_stage_trains_on_the_kl_to_its_parent_at_tp2(tiny_parent, distilled_stage):
    """train.loss=kd: the logged training loss is the KL to the parent's logits (small: the decomposed student
    starts near its parent), the validation loss stays the LM loss. (That the KL falls under training:
    tests/distributed/test_distill.py.)"""
    out, stdout = distilled_stage
    assert f"teacher {tiny_parent}: " in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["train_losses"]) == 6 and all(1e-6 < kl < 0.05 for kl in summary["train_losses"])
    assert [step for step, _ in summary["valid_losses"]] == [3, 6] and summary["valid_losses"][0][1] > 5


def test_a_distilled_stage_killed_mid_training_resumes_exactly(tiny_parent, distilled_stage, tmp_path):
    """The teacher is reloaded from the parent on the rerun; nothing of it is in the training state."""
    out = tmp_path / "kd"
    assert_resumes_exactly(distilled_stage[0], out, killed_at_step_3(tiny_parent, out, *DISTILLED))


def test_a_teacher_of_another_architecture_is_refused_before_any_work(tiny_parent, tmp_path, recipe_here):
    other = save_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    out = tmp_path / "out"
    run = recipe_here(f"parent={tiny_parent}", f"output={out}", *TRAINED, "train.loss=lm+kd", f"train.teacher={other}")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "the teacher's architecture differs from the student's (hidden_size 32 vs 64, ffn_hidden_size 64 vs 160" \
        in run.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_stage_killed_mid_training_resumes_exactly_and_on_fewer_ranks_closely(tiny_parent, trained_stage, tmp_path):
    """The kill's leftovers resumed twice: at DP=2, exactly the uninterrupted run; at DP=1 (a job requeued on other
    nodes), the same global batch, now two micro-batches accumulated on one rank, continues from the checkpoint
    saved at DP=2 and ends where the uninterrupted DP=2 run ended (fp32; the gradients sum in another order, hence
    the tolerance). The checkpoint's RNG streams load at the new size; no step draws from them (no dropout)."""
    out = tmp_path / "stage"
    args = killed_at_step_3(tiny_parent, out, *TRAINED)
    killed = shutil.copytree(f"{out}.partial", tmp_path / "killed", symlinks=True)
    assert_resumes_exactly(trained_stage, out, args)
    shutil.rmtree(out)
    killed.rename(f"{out}.partial")
    run = recipe(*args, nproc=1)
    assert run.returncode == 0, run.stderr[-3000:]
    expected, resumed = (json.loads((s / "summary.json").read_text()) for s in (trained_stage, out))
    assert (resumed["tp"], resumed["dp"]) == (1, 1)
    assert resumed["train_losses"][:2] == expected["train_losses"][:2]  # the steps taken at DP=2, read back
    assert resumed["train_losses"] == pytest.approx(expected["train_losses"], rel=1e-5)
    (steps, valid), (_, expected_valid) = zip(*resumed["valid_losses"]), zip(*expected["valid_losses"])
    assert steps == (3, 6) and valid == pytest.approx(expected_valid, rel=1e-5)
    assert resumed["member_perplexity"] == pytest.approx(expected["member_perplexity"], rel=1e-5)


def test_a_stage_trains_the_same_at_tp1_x_dp2_and_tp2_x_dp1(tiny_parent, trained_stage, tmp_path):
    """The same global batch, split over data-parallel ranks or taken by one tensor-parallel pair:
    the same losses (fp32; the reductions run in another order, hence the tolerance)."""
    out = tmp_path / "tp2"
    run = recipe(f"parent={tiny_parent}", f"output={out}", *TRAINED, "parallel.tensor_model_parallel_size=2", nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    dp2, tp2 = (json.loads((s / "summary.json").read_text()) for s in (trained_stage, out))
    assert (dp2["tp"], dp2["dp"], tp2["tp"], tp2["dp"]) == (1, 2, 2, 1)
    assert tp2["train_losses"] == pytest.approx(dp2["train_losses"], rel=1e-5)
    assert tp2["train_losses"][-1] < tp2["train_losses"][0]


def test_a_bf16_mixed_stage_trains_like_the_fp32_one_and_exports_its_bf16_weights_widened(
        tiny_parent, trained_stage, tmp_path):
    """mixed_precision=bf16_mixed at TP=2 (its collectives in bf16) against fp32 at TP=1 x DP=2: the
    same steps on the same batches within bf16's error. The member is the model's bf16 weights (as
    megatron's own checkpoint and Bridge's export have it), widened: the factored export's weights are
    each a bf16 value stored in fp32, which no fp32-trained weight is."""
    out = tmp_path / "bf16"
    run = recipe(f"parent={tiny_parent}", f"output={out}", *TRAINED, "mixed_precision=bf16_mixed",
                 "parallel.tensor_model_parallel_size=2", "export=[merged,factored]", nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    fp32, bf16 = (json.loads((s / "summary.json").read_text()) for s in (trained_stage, out))
    assert bf16["train_losses"] == pytest.approx(fp32["train_losses"], rel=1e-3)
    assert bf16["member_perplexity"] == pytest.approx(fp32["member_perplexity"], rel=1e-3)
    factored = safetensors.torch.load_file(out / "hf-factored" / "model.safetensors")
    assert {w.dtype for w in [*factored.values(), *merged_weights(out).values()]} == {torch.float32}
    assert all(torch.equal(w, w.bfloat16().float()) for w in factored.values())


@pytest.mark.parametrize("name, key", [("decompose", "eval.perplexity_blocks"),
                                       ("family", "stage.eval.perplexity_blocks")])
def test_more_held_out_blocks_than_a_corpus_holds_are_refused_before_any_work(tiny_parent, tmp_path, recipe_here, name,
                                                                               key):
    """news's held-out text is 17 blocks of SmolLM2's tokens: refused before the output is claimed (a claimed
    folder would resume only with the same settings) and before the parent loads."""
    out = tmp_path / "out"
    run = recipe_here(f"parent={tiny_parent}", f"output={out}", f"{key}=18", name=name,
                      config=FAMILY_YAML if name == "family" else YAML)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"error: {key}=18: the held-out news text holds 17 blocks" in run.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_stage_refused_for_bad_input_after_it_started_reruns_with_the_input_fixed(tiny_parent, tmp_path, recipe_here):
    """The plan's budget is checked against the parent, after the output is claimed: nothing was kept,
    so the rerun with another budget takes the folder over instead of asking for the same settings."""
    out, quick = tmp_path / "stage", ["train.steps=0", "export=[]", "eval.tasks=[]", "eval.perplexity_blocks=0",
                                       "plrd.calibration.tokens=512", "plrd.calibration.seq_length=128"]
    run = recipe_here(f"parent={tiny_parent}", f"output={out}", *quick, "plrd.plan.keep=null",
                      "plrd.plan.target_params=1000")
    assert run.returncode == 2 and "is below the smallest plan" in run.stderr, run.stderr[-3000:]
    run = recipe(f"parent={tiny_parent}", f"output={out}", *quick, "plrd.plan.keep=0.6")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["plrd"]["plan"]["keep"] == 0.6


def test_a_stage_stopped_after_its_decomposition_reruns_with_other_training_settings_without_decomposing_again(
        tiny_parent, tmp_path, recipe_here):
    """Killed after its decomposition was saved and before any training checkpoint, a stage reruns with changed
    training settings and keeps the decomposition; the rows of the steps it had taken go (no checkpoint holds
    them, and with train.steps=0 no training would drop them). Any other change is still refused."""
    out = tmp_path / "stage"
    partial = out.with_name("stage.partial")
    settings = [f"parent={tiny_parent}", f"output={out}", "plrd.calibration.tokens=512", "plrd.calibration.seq_length=128",
                "eval.perplexity_blocks=0", "eval.tasks=[]", "export=[merged]", "train.seq_length=64",
                "train.micro_batch=2", "train.global_batch=2"]
    kill_when(launch(*settings, "train.steps=2000", nproc=1), lambda: logged_steps(partial / "metrics.jsonl") >= 1)
    assert [p.name for p in (partial / "train").iterdir()] == [DECOMPOSED]
    decomposed = (partial / "plan.json").stat().st_mtime_ns  # written by the decomposition
    run = recipe_here(*settings, "train.steps=0", "plrd.ridge=0.5")
    assert run.returncode == 2 and "plrd.ridge: " in run.stderr  # the decomposition's own settings: refused
    run = recipe(*settings, "train.steps=0")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not trained yet, so it trains with the changed settings: train.steps: 2000 -> 0" in run.stdout
    assert (out / "plan.json").stat().st_mtime_ns == decomposed
    assert not (out / "metrics.jsonl").exists() and json.loads((out / "summary.json").read_text())["train_losses"] == []


@pytest.mark.parametrize("name, overrides, nproc, message", [
    ("decompose", ["dataset.blend=[[shakespeare, wikipedia], null]", "train.eval_iters=100000"], 1,
     "fewer than the 400000 asked for"),  # an unweighted blend of several prefixes: megatron repeats no epoch
    ("decompose", ["parallel.tensor_model_parallel_size=2"], 2,
     "parallel.tensor_model_parallel_size=2 must divide the number of KV heads (1)"),
    ("family", ["stage.train.loss=lm+kd", "stage.train.teacher=TEACHER"], 1,
     "stage.train.teacher='TEACHER': the teacher's architecture differs"),
    ("decompose", ["train.seq_length=4096"], 1,  # LlamaConfig's default max_position_embeddings
     "train.seq_length=4096 is longer than the parent's max_position_embeddings (2048)"),
    ("family", ["stage.plrd.calibration.seq_length=4096", "stage.plrd.calibration.tokens=4096"], 1,
     "stage.plrd.calibration.seq_length=4096 is longer than the parent's max_position_embeddings (2048)"),
    ("decompose", ["export_dtype=parent"], 1,  # a parent whose config.json names float64 (below)
     "export_dtype='parent': the parent's config names float64, not one of ['float32', 'bfloat16', 'float16']"),
])
def test_what_a_stage_would_refuse_once_started_is_refused_before_its_output_is_claimed(
        tiny_parent, tmp_path, recipe_here, name, overrides, nproc, message):
    """A claimed folder that holds a decomposition resumes only with its settings: the data's splits, the TP size,
    the teacher, the sequence lengths and the exports' dtype are checked first, and a family names its stages' keys
    as its user wrote them."""
    parent = save_tiny_llama(tmp_path / "mqa", num_key_value_heads=1) if nproc == 2 else tiny_parent
    if "export_dtype=parent" in overrides:
        parent = save_tiny_llama(tmp_path / "fp64")
        config = json.loads((parent / "config.json").read_text())
        (parent / "config.json").write_text(json.dumps(config | {"dtype": "float64"}))
    teacher = save_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    out = tmp_path / "out"
    prefix = "stage." if name == "family" else ""
    small = [f"{prefix}{line}" for line in TRAINED if f"{prefix}{line}".split("=")[0] not in
             {override.split("=")[0] for override in overrides}]
    args = (f"parent={parent}", f"output={out}", *small, *[o.replace("TEACHER", str(teacher)) for o in overrides])
    config = FAMILY_YAML if name == "family" else YAML
    run = recipe(*args, nproc=2, name=name, config=config) if nproc == 2 else recipe_here(*args, name=name, config=config)
    # 2: the recipe's refusal; under torchrun, the launcher's own failure status for a failed rank
    assert run.returncode == (2 if nproc == 1 else 1), run.stderr[-3000:]
    assert message.replace("TEACHER", str(teacher)) in run.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_training_settings_change_only_while_nothing_is_trained_exported_or_finished(tmp_path):
    """What a rerun keeps (an export of the untrained model, a finished stage) was made with the old settings."""
    init_distributed()
    stage, family = tmp_path / "stage.partial", tmp_path / "family.partial"
    configs = lambda cls, path, steps: load_config(cls, path, [f"output={tmp_path / 'x'}", steps])
    for cls, path, folder, member, untrained in (
            (DecomposeConfig, YAML, stage, stage, lambda: _untrained(stage)),
            (FamilyConfig, FAMILY_YAML, family, family / "stage1-keep0.6.partial", lambda: _family_untrained(family))):
        steps = "train.steps=8" if cls is DecomposeConfig else "stage.train.steps=8"
        section = "" if cls is DecomposeConfig else "stage."
        claim(folder, configs(cls, path, steps), untrained=untrained, section=section)
        (member / "train" / DECOMPOSED).mkdir(parents=True)  # decomposed, not trained
        (member / "decomposed.json").write_text("{}")
        claim(folder, configs(cls, path, steps.replace("8", "16")), untrained=untrained, section=section)  # taken
        (member / "hf-merged").mkdir()  # what train.steps=0 writes before lm-eval
        with pytest.raises(InputError, match=f"another config.*{section}train.steps: 16 -> 8"):
            claim(folder, configs(cls, path, steps), untrained=untrained, section=section)
    (family / "stage1-keep0.6.partial").rename(family / "stage1-keep0.6")  # a finished stage has trained
    shutil.rmtree(family / "stage1-keep0.6" / "hf-merged")
    with pytest.raises(InputError, match="another config"):
        claim(family, configs(FamilyConfig, FAMILY_YAML, "stage.train.steps=8"), untrained=lambda: _family_untrained(
            family), section="stage.")


def test_an_output_taken_over_by_other_settings_keeps_nothing_the_stopped_run_left(tmp_path):
    """A family stopped before its first decomposition was saved, rerun with another keep: the old stage's folder
    (a decomposition's checkpoint without its record, gigabytes at 7B) does not end up in the finished output."""
    init_distributed()
    family = tmp_path / "family.partial"
    configs = lambda keep: load_config(FamilyConfig, FAMILY_YAML, [f"output={tmp_path / 'family'}", f"keep=[{keep}]",
                                                                   "baselines=[control]"])
    claim(family, configs(0.6), untrained=lambda: _family_untrained(family), section="stage.")
    (family / "stage1-keep0.6.partial" / "train" / DECOMPOSED).mkdir(parents=True)
    (family / ".lock").touch()  # the run's own, held by sole_run
    claim(family, configs(0.5), untrained=lambda: _family_untrained(family), section="stage.")
    assert sorted(path.name for path in family.iterdir()) == [".lock", "config.json"]
    assert json.loads((family / "config.json").read_text())["keep"] == [0.5]


def test_a_finished_stage_is_kept_and_another_config_against_it_is_refused(tiny_parent, trained_stage, recipe_here):
    """Rerun, a finished stage is read back; only the optimizer's state that a run stopped between the
    stage's rename and its cleanup would leave is removed."""
    before = {p: p.stat().st_mtime_ns for p in trained_stage.rglob("*")}
    (trained_stage / "train" / "iter_0000006").mkdir(parents=True)
    run = recipe(f"parent={tiny_parent}", f"output={trained_stage}", *TRAINED, nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in trained_stage.rglob("*")} == before
    run = recipe_here(f"parent={tiny_parent}", f"output={trained_stage}", *TRAINED, "optimizer.lr=2e-3")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "was started with another config" in run.stderr and "optimizer.lr: 0.001 -> 0.002" in run.stderr
    assert {p: p.stat().st_mtime_ns for p in trained_stage.rglob("*")} == before


def test_a_stage_s_folder_given_as_the_next_stage_s_parent_is_refused_naming_its_checkpoint(trained_stage, tmp_path,
                                                                                            recipe_here):
    """Its config.json is the stage's settings, not an HF config (before: "config.json names no model_type")."""
    out = tmp_path / "next"
    run = recipe_here(f"parent={trained_stage}", f"output={out}", "plrd.plan.keep=0.3")
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"{trained_stage} is a stage's output, not a model: its member is {trained_stage / 'checkpoint'}" in run.stderr
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_family_killed_in_stage_2_keeps_stage_1_and_finishes(tiny_parent, tmp_path, recipe_here):
    out = tmp_path / "family"
    partial = Path(f"{out}.partial")
    args = (f"parent={tiny_parent}", f"output={out}", "keep=[0.6, 0.3]", "baselines=[]",  # the kill is in stage 2
            "stage.plrd.calibration.tokens=512",
            "stage.plrd.calibration.seq_length=128", "stage.train.steps=4", "stage.train.seq_length=64",
            "stage.train.warmup_steps=1", "stage.train.save_interval=2", "stage.optimizer.lr=1e-3", "stage.export=[merged]", "stage.eval.tasks=[]",
            "stage.eval.perplexity_blocks=2")
    stage1 = partial / "stage1-keep0.6"
    kill_when(launch(*args, nproc=1, name="family", config=FAMILY_YAML),
              lambda: (partial / "stage2-keep0.3.partial" / "decomposed.json").is_file())
    before = {p: p.stat().st_mtime_ns for p in stage1.rglob("*")}
    records = {p.relative_to(partial): p.read_text() for p in before if p.name in RECORDS}
    assert before and records and not out.exists()
    planned = (partial / "stage2-keep0.3.partial" / "plan.json").stat().st_mtime_ns
    run = recipe(*args, name="family", config=FAMILY_YAML)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "stage2-keep0.3" / "plan.json").stat().st_mtime_ns == planned  # stage 2 not decomposed again
    # stage 1 untouched, but for its records, which the family's rename made name the final folders
    assert {p.relative_to(out): t for p, t in ((p, p.stat().st_mtime_ns) for p in (out / stage1.name).rglob("*"))
            if p.name not in RECORDS} == {p.relative_to(partial): t for p, t in before.items() if p.name not in RECORDS}
    assert {name: (out / name).read_text() for name in records} == {
        name: text.replace(f"{partial}/", f"{out}/") for name, text in records.items()}
    family = json.loads((out / "family.json").read_text())
    assert [len(m["train_losses"]) for m in family["members"]] == [4, 4]
    again = recipe_here(*args, name="family", config=FAMILY_YAML)
    assert again.returncode == 0 and "is complete (same config): nothing to do" in again.stdout
    assert "wrote" not in again.stdout and f"{out}: family.md, family.json" in again.stdout
