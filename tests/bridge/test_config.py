"""The ``plrd:`` section on Bridge's ConfigContainer, through Bridge's own process_config_with_overrides."""

import dataclasses
import functools
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest
from megatron.bridge.models.gpt_provider import GPTModelProvider
from megatron.bridge.training.config import (CheckpointConfig, ConfigContainer, LoggerConfig, MockGPTDatasetConfig,
                                             OptimizerConfig, SchedulerConfig, TokenizerConfig, TrainingConfig)

from tiny_llama import save_tiny_llama

from nemo_plrd.bridge.config import PLRDConfigContainer, PLRDTrainingConfig, process_plrd_config, with_plrd
from nemo_plrd.bridge.distill import DistillationStep, stage_forward_step
from nemo_plrd.config import CalibrationConfig, PLRDConfig, PlanConfig
from nemo_plrd.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


def bridge_container() -> ConfigContainer:
    """What a Bridge recipe function returns (a tiny model on mock data)."""
    return ConfigContainer(
        train=TrainingConfig(train_iters=4, global_batch_size=4, micro_batch_size=2),
        model=GPTModelProvider(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4), scheduler=SchedulerConfig(),
        dataset=MockGPTDatasetConfig(seq_length=64, random_seed=1234, dataloader_type="single"), logger=LoggerConfig(),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=128), checkpoint=CheckpointConfig())


def container() -> PLRDConfigContainer:
    return with_plrd(bridge_container(), PLRDConfig(plan=PlanConfig(keep=0.6), calibration=CalibrationConfig(tokens=512)))


def test_a_recipe_returning_bridge_s_own_container_is_refused_naming_the_helper_that_adds_plrd():
    with pytest.raises(InputError, match=r"the recipe returned a ConfigContainer, not a PLRDConfigContainer: "
                                         r"nemo_plrd\.bridge\.config\.with_plrd\(cfg, PLRDConfig\(\.\.\.\)\) adds"):
        process_plrd_config(bridge_container())


def test_yaml_and_overrides_land_in_the_plrd_section_and_in_bridge_s_own(tmp_path):
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("plrd:\n  plan: {keep: null, target_params: 80000}\n  method: svd\ntrain:\n  train_iters: 8\n")
    cfg = process_plrd_config(container(), recipe, ["plrd.calibration.tokens=1024", "plrd.plan.multiple=16",
                                                    "optimizer.lr=3e-4"])
    assert isinstance(cfg, PLRDConfigContainer) and isinstance(cfg.plrd, PLRDConfig)
    assert cfg.plrd.plan.request() == {"target_params": 80000, "allocation": "uniform", "multiple": 16}
    assert (cfg.plrd.method, cfg.plrd.calibration.tokens, cfg.plrd.calibration.seq_length) == ("svd", 1024, 512)
    assert (cfg.train.train_iters, cfg.optimizer.lr) == (8, 3e-4)


@pytest.mark.parametrize("yaml, overrides, message", [
    ("", ["plrd.stage=abc"], "unknown key(s) ['plrd.stage']; allowed here: ['plrd.plan', 'plrd.calibration'"),
    ("", ["+plrd.no_such_key=1"], "unknown key(s) ['plrd.no_such_key']"),  # Bridge would drop it silently
    ("plrd:\n  plan: {kep: 0.5}\n", [], "unknown key(s) ['plrd.plan.kep']"),  # Bridge would too
    ("", ["plrd.calibration.tokens=abc"], "plrd.calibration.tokens='abc' must be int"),
    ("", ["plrd.plan.keep=1.5"], "plrd.plan.keep=1.5 must be a fraction in (0, 1)"),
    ("", ["plrd.method=qr"], "plrd.method='qr' is not one of ('activation', 'svd')"),
])
def test_unknown_and_ill_typed_plrd_keys_are_refused_naming_the_key(tmp_path, yaml, overrides, message):
    recipe = tmp_path / "stage.yaml"
    recipe.write_text(yaml or "{}\n")
    cfg = container()
    before = dataclasses.asdict(cfg.plrd)
    with pytest.raises(ValueError) as error:
        process_plrd_config(cfg, recipe, overrides)
    assert str(error.value).startswith(message)  # the key first, named from the top
    assert dataclasses.asdict(cfg.plrd) == before  # refused before Bridge touched the container


def test_a_yaml_key_the_job_does_not_have_is_refused_naming_it(tmp_path):
    """Bridge skips it with a log warning: a misspelt train.loss would train with the LM loss."""
    recipe = tmp_path / "stage.yaml"
    recipe.write_text("train:\n  los: kd\n  train_iters: 8\nmodel:\n  tensor_model_paralel_size: 2\n"
                      "optimizer:\n  lr: 3.0e-4\n")
    with pytest.raises(InputError, match=re.escape(f"{recipe}: train.los, model.tensor_model_paralel_size is not a "
                                                   "setting of the job")):
        process_plrd_config(container(), recipe)
    recipe.write_text("train:\n  loss: kd\n  train_iters: 8\noptimizer:\n  lr: 3.0e-4\n")
    assert process_plrd_config(container(), recipe).train.loss == "kd"


def test_the_local_stage_s_loss_keys_land_on_bridge_s_training_config():
    cfg = process_plrd_config(container(), None, ["train.loss=lm+kd", "train.kd_weight=0.5", "train.train_iters=8"])
    assert isinstance(cfg.train, PLRDTrainingConfig)  # the recipe's plain TrainingConfig, converted
    assert (cfg.train.loss, cfg.train.kd_weight, cfg.train.teacher, cfg.train.train_iters) == ("lm+kd", 0.5, "parent", 8)
    for overrides, message in ((["train.loss=kl"], "train.loss='kl' is not one of ['lm', 'kd', 'lm+kd']"),
                               (["train.kd_weight=abc"], "train.kd_weight=abc must be > 0"),
                               (["train.loss=kd", "train.kd_weight=2"], "train.loss='kd' takes no weight"),
                               (["train.teacher=/nowhere"], "train.teacher='/nowhere' is not a directory")):
        with pytest.raises(ValueError) as error:
            process_plrd_config(container(), None, overrides)
        assert message in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.first_sample=-4"], "train.first_sample=-4 must be >= 0"),
    (["train.first_sample=abc"], "train.first_sample='abc' must be an integer"),  # Bridge sets what it is given
    (["train.first_sample=1.5"], "train.first_sample=1.5 must be an integer"),
    (["train.stream_samples=true"], "train.stream_samples=True must be an integer or null"),
    (["train.first_sample=8", "train.stream_samples=20"],
     "train.stream_samples=20 must hold train.first_sample=8 + train.train_iters x train.global_batch_size (16)"),
    (["train.stream_samples=32", "dataset.dataloader_type=cyclic"],
     "dataset.dataloader_type='cyclic' with train.first_sample"),
    (["train.first_sample=16", "train.rampup_batch_size=[2,2,8]"], "train.rampup_batch_size=[2, 2, 8] with train."),
])
def test_a_stage_continuing_a_stream_refuses_what_its_sampler_cannot_honour(overrides, message):
    assert process_plrd_config(container(), None, ["train.first_sample=16", "train.stream_samples=32"]).train.in_stream
    with pytest.raises(InputError) as error:
        process_plrd_config(container(), None, overrides)
    assert message in str(error.value)


def test_a_bridge_stage_s_teacher_is_resolved_and_checked_before_any_work(tiny_parent, tmp_path):
    cfg = process_plrd_config(container(), None, ["train.loss=kd"])
    step = stage_forward_step(cfg, str(tiny_parent), None)
    assert isinstance(step, DistillationStep) and step.source == tiny_parent  # stage 1: parent = --hf-path
    with pytest.raises(ValueError, match="train.teacher='parent' names the family's parent, which a stage started "
                                         "from --parent /ckpt does not know"):
        stage_forward_step(cfg, str(tiny_parent), "/ckpt")
    other = save_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    cfg = process_plrd_config(container(), None, ["train.loss=kd", f"train.teacher={other}"])
    with pytest.raises(ValueError, match=r"the teacher's architecture differs from the student's \(hidden_size 32 vs 64"):
        stage_forward_step(cfg, str(tiny_parent), None)


def test_bridge_s_own_sections_keep_bridge_s_checks_and_a_bad_override_or_file_is_named(tmp_path):
    """Bridge refuses a key its sections lack with an OverridesError traceback; the stage names the override."""
    with pytest.raises(InputError, match=re.escape("override 'train.no_such_key=1': Could not override "
                                                   "'train.no_such_key'. To append to your config use +train.")):
        process_plrd_config(container(), None, ["train.no_such_key=1"])
    (tmp_path / "list.yaml").write_text("- train\n")
    for path, message in ((tmp_path / "missing.yaml", "does not exist"), (tmp_path, "is a folder; give a YAML file"),
                          (tmp_path / "list.yaml", "must hold a mapping of keys to values")):
        with pytest.raises(InputError, match=re.escape(f"{path} {message}")):
            process_plrd_config(container(), path)


def test_a_bridge_key_misspelt_in_a_family_s_job_is_refused_at_submission_where_the_jobs_run_on_this_bridge(
        cluster_family, plrd_here, tmp_path):
    """Without a container image the jobs run on the Bridge installed where ``plrd submit`` runs: it builds
    the stage's config as each job will, so a misspelt key is refused before the queue, not by the first job
    after it. With one, the container's Bridge is the jobs' own, and each job checks its config as it starts;
    so does each job whose config cannot be built where it is submitted (a login node without the GPU stack)."""
    family = cluster_family("llama2_7b_family.yaml")
    submit = ["submit", ROOT / "recipes" / "llama2_7b_family.yaml", "--nodes", "1", "--gpus-per-node", "8",
              "--workdir", ROOT, "--dry-run", f"parent={family.parent}", f"output={family.output}",
              f"blend=[[{family.blend[0][0]}], null]", "eval.tasks=[]", "eval.perplexity_blocks=0"]
    assert plrd_here(*submit).stdout.count("#!/bin/bash") == 4  # the shipped job builds
    typo = 'job.overrides=["optimizer.lrr=1e-4"]'
    refused = plrd_here(*submit, typo)
    assert refused.returncode == 2 and not refused.stdout
    assert ("job (job.config_file, job.overrides), as this machine's Megatron-Bridge reads it: override "
            "'optimizer.lrr=1e-4': Could not override 'optimizer.lrr'") in refused.stderr
    in_container = plrd_here(*submit, typo, "--container-image", "nvcr.io/nvidia/nemo:26.06")
    assert in_container.returncode == 0 and "optimizer.lrr=1e-4" in in_container.stdout
    checkout = tmp_path / "checkout"  # the jobs' --workdir, holding the job's own recipe module
    for name in ("recipes/run_plrd.py", "recipes/bridge/llama_stage.yaml"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, checkout / name)
    elsewhere = [arg if arg != ROOT else checkout for arg in submit]
    for recipe, reason in (("def stage(hf_path):\n    raise RuntimeError('No CUDA GPUs are available')\n",
                            "RuntimeError: No CUDA GPUs are available"),  # found on the jobs' PYTHONPATH
                           ("import cuda_only_kernels\n", "InputError: job.recipe='gpu_recipe:stage' cannot be "
                                                          "loaded: No module named 'cuda_only_kernels'")):
        (checkout / "gpu_recipe.py").write_text(recipe)
        sys.modules.pop("gpu_recipe", None)
        unbuilt = plrd_here(*elsewhere, typo, "job.recipe=gpu_recipe:stage", "~architecture")  # planned from the parent
        assert unbuilt.returncode == 0 and unbuilt.stdout.count("#!/bin/bash") == 4
        assert f"note: the stages' Bridge config cannot be built on this machine ({reason}" in unbuilt.stderr


def test_the_shipped_gpu_stage_yaml_lands_on_the_recipe(tmp_path):
    """recipes/bridge/llama_stage.yaml over nemo_plrd.bridge.recipe.llama_stage (a tiny HF LLaMA here)."""
    import shutil

    import torch
    import transformers

    from nemo_plrd.assets import smollm2_135m
    from nemo_plrd.bridge.recipe import llama_stage

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_135m() / name, tmp_path / name)
    yaml = Path(__file__).resolve().parents[2] / "recipes" / "bridge" / "llama_stage.yaml"
    cfg = process_plrd_config(llama_stage(str(tmp_path)), yaml, ["plrd.plan.keep=0.4", "checkpoint.save=/runs/s1"])
    assert (cfg.model.tensor_model_parallel_size, cfg.model.sequence_parallel, cfg.model.num_layers) == (2, True, 2)
    assert (cfg.train.train_iters, cfg.train.global_batch_size, cfg.dataset.seq_length) == (240, 256, 4096)
    assert (cfg.mixed_precision, cfg.checkpoint.save, cfg.plrd.plan.keep) == ("bf16_mixed", "/runs/s1", 0.4)
    assert cfg.plrd.calibration.tokens == 262144 and cfg.tokenizer.tokenizer_model == str(tmp_path)


def test_a_resumed_stage_on_a_megatron_training_model_config_builds_the_factored_spec(tmp_path):
    """ConfigContainer.model may be megatron-core 0.19's GPTModelConfig instead of Bridge's provider
    (it proxies its TransformerConfig's fields): a resumed stage's layer spec is factored at the
    recorded ranks and the job loads its own checkpoint."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.models.gpt import GPTModelConfig

    from nemo_plrd.bridge.stage import prepare_stage
    from nemo_plrd.layers import LowRankColumnParallelLinear
    from nemo_plrd.plan import plan_ranks
    from nemo_plrd.model import LlamaArch

    arch = LlamaArch(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                     vocab_size=128, max_sequence_length=64)
    plan = plan_ranks([arch.slot_shapes()] * 2, keep=0.5)
    cfg = container()
    cfg.model = GPTModelConfig(transformer=TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu), vocab_size=128)
    cfg.dataset.blend = ([data_prefix(tmp_path)], None)
    cfg.checkpoint.save = str(tmp_path / "stage")
    (tmp_path / "stage").mkdir()
    plan.save(tmp_path / "stage" / "plrd_plan.json")
    (tmp_path / "stage" / "latest_checkpointed_iteration.txt").write_text("2")
    prepare_stage(cfg, hf_path="unused when resuming")
    assert cfg.checkpoint.load == cfg.checkpoint.save
    block = cfg.model.transformer_layer_spec(cfg.model)
    assert cfg.model.hetereogenous_dist_checkpoint  # set by the spec, as the checkpoint's keys were
    qkv = block.layer_specs[0].submodules.self_attention.submodules.linear_qkv
    assert qkv.module is LowRankColumnParallelLinear and qkv.params == {"rank": plan.rank(0, "linear_qkv")}


def data_prefix(tmp_path: Path) -> str:
    """A megatron indexed dataset's files (empty where missing): what a stage's setup looks for."""
    for path in (tmp_path / "data.bin", tmp_path / "data.idx"):
        if not path.exists():
            path.write_text("")
    return str(tmp_path / "data")


def stage_folder(tmp_path: Path, plan: Optional[PlanConfig] = None, **record) -> tuple[PLRDConfigContainer, Path]:
    """A stage's config whose checkpoint.save holds an interrupted job (a tracker, a plan and, given
    ``plan``, the settings it started with: plan and calibration on 512 tokens, from hf_path 'hf', and
    ``record``'s keys)."""
    from nemo_plrd.bridge.checkpoint import PLAN_FILE, STAGE_FILE, TRACKER

    cfg = container()
    cfg.dataset.blend = ([data_prefix(tmp_path)], None)
    cfg.checkpoint.save = str(tmp_path / "stage")
    save = tmp_path / "stage"
    save.mkdir()
    (save / TRACKER).write_text("2")
    (save / PLAN_FILE).write_text("{}")
    if plan is not None:
        started = PLRDConfig(plan=plan, calibration=CalibrationConfig(tokens=512))
        (save / STAGE_FILE).write_text(json.dumps({"plrd": dataclasses.asdict(started), "hf_path": "hf",
                                                   "parent": None, **record}))
    (save / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    return cfg, save


@pytest.mark.parametrize("budget", [{"train_iters": 2}, {"train_iters": None, "train_samples": 8}])
def test_a_stage_rerun_once_trained_saves_nothing_again(tmp_path, budget):
    """Its last checkpoint (step 2 of 2; with train.train_samples, Bridge derives the step count only after the
    stage is prepared) is its save interval: Bridge, training no step, saves at the end only off the interval."""
    from nemo_plrd.bridge.checkpoint import PLAN_FILE
    from nemo_plrd.bridge.stage import prepare_stage
    from nemo_plrd.plan import RankPlan, SlotPlan

    cfg, save = stage_folder(tmp_path)
    RankPlan((SlotPlan(0, "linear_proj", 64, 64, 8),)).save(save / PLAN_FILE)
    for key, value in budget.items():
        setattr(cfg.train, key, value)
    prepare_stage(cfg, hf_path="hf")
    assert cfg.checkpoint.save_interval == 2


def test_a_blend_of_another_shape_or_a_sequence_past_the_parent_s_is_refused_at_setup(tmp_path, tiny_parent):
    """Named before any rank loads a model (before: megatron's assertion on every rank, or a prefix read
    character by character); a sequence longer than the parent's positions, which neither megatron's RoPE nor
    Bridge refuses, as the local stage refuses it."""
    from nemo_plrd.bridge.checkpoint import TRACKER
    from nemo_plrd.bridge.stage import prepare_stage

    prefix = data_prefix(tmp_path)
    cases = ((("dataset", "blend", [prefix]), "dataset.blend=[" + repr(prefix) + "] must be [prefixes, weights]"),
             (("dataset", "blend", ([prefix, prefix], [0.5])), "must be [prefixes, weights]"),
             (("dataset", "seq_length", 4096), "dataset.seq_length=4096 is longer than the parent's "
                                               "max_position_embeddings (512)"),
             (("plrd.calibration", "seq_length", 4096), "plrd.calibration.seq_length=4096 is longer than the "
                                                        "parent's max_position_embeddings (512)"))
    for number, ((section, key, value), message) in enumerate(cases):
        (tmp_path / str(number)).mkdir()
        cfg, save = stage_folder(tmp_path / str(number))
        (save / TRACKER).unlink()  # a fresh start
        setattr(functools.reduce(getattr, section.split("."), cfg), key, value)
        with pytest.raises(InputError, match=re.escape(message)):
            prepare_stage(cfg, hf_path=str(tiny_parent))


def test_a_stage_s_data_is_looked_for_at_setup_and_indexed_by_its_version(tmp_path, tiny_parent, monkeypatch):
    """megatron's default index cache, beside the data, is keyed by the prefix's path alone: a dataset prepared again
    at that path would be read through the old one's indices. A stage indexes each version apart, in PLRD_CACHE.
    Data named by ``dataset.data_path`` is looked for and indexed as a blend is."""
    from nemo_plrd.bridge.checkpoint import TRACKER
    from nemo_plrd.bridge.stage import prepare_stage
    from nemo_plrd.data import index_cache

    monkeypatch.setenv("PLRD_CACHE", str(tmp_path / "cache"))
    caches = []
    for version in ("first", "prepared again", "missing"):
        folder = tmp_path / version.replace(" ", "-")
        folder.mkdir()
        cfg, save = stage_folder(folder)
        (save / TRACKER).unlink()  # a fresh start
        if version == "missing":
            cfg.dataset.blend = ([str(tmp_path / "missing")], None)
            with pytest.raises(InputError, match=r"dataset.blend: '.*missing' is not a megatron indexed dataset"):
                prepare_stage(cfg, hf_path=str(tiny_parent))
            continue
        (tmp_path / "data.bin").write_text(version)  # the same prefix, other files
        cfg.dataset.blend = ([data_prefix(tmp_path)], None)
        prepare_stage(cfg, hf_path=str(tiny_parent))
        caches.append(cfg.dataset.path_to_cache)
        assert caches[-1] == str(index_cache(cfg.dataset.blend[0]) / "bridge")
        assert caches[-1].startswith(str(tmp_path / "cache"))
    assert caches[0] != caches[1]
    (tmp_path / "by-path").mkdir()  # Megatron-LM's --data-path, weights and prefixes in one string, as Bridge takes it
    cfg, save = stage_folder(tmp_path / "by-path")
    (save / TRACKER).unlink()
    cfg.dataset.blend, cfg.dataset.data_path = None, f"1 {data_prefix(tmp_path)}"
    prepare_stage(cfg, hf_path=str(tiny_parent))
    assert cfg.dataset.blend == ([data_prefix(tmp_path)], [1.0]) and cfg.dataset.path_to_cache == caches[1]
    (tmp_path / "own").mkdir()
    cfg, save = stage_folder(tmp_path / "own")  # a folder the job names is its own
    (save / TRACKER).unlink()
    cfg.dataset.path_to_cache = str(tmp_path / "indices")
    prepare_stage(cfg, hf_path=str(tiny_parent))
    assert cfg.dataset.path_to_cache == str(tmp_path / "indices")


def test_a_stage_resumed_with_other_plrd_settings_is_refused_naming_them(tmp_path):
    from nemo_plrd.bridge.stage import prepare_stage

    cfg, save = stage_folder(tmp_path, PlanConfig(keep=0.4))  # the job asks for keep=0.6
    with pytest.raises(InputError, match=r"checkpoint.save='.*stage' holds a stage started with other settings; "
                                         r"rerun with the same to resume it.*plrd.plan.keep: 0.4 -> 0.6$"):
        prepare_stage(cfg, hf_path="hf")
    assert len((save / "metrics.jsonl").read_text().splitlines()) == 3  # refused before anything changed


def test_a_stage_resumed_with_another_loss_is_refused_naming_it(tmp_path):
    """Its optimizer's state and metrics are the distilled run's; the LM loss would go on from them unsaid."""
    from nemo_plrd.bridge.stage import prepare_stage

    cfg, _ = stage_folder(tmp_path, PlanConfig(keep=0.6), train={"loss": "kd", "kd_weight": 1.0, "teacher": "parent"})
    with pytest.raises(InputError, match=r"other settings;.*Differences \(then -> now\): train.loss: 'kd' -> 'lm'$"):
        prepare_stage(cfg, hf_path="hf")  # the only difference


def test_a_stage_resumed_on_other_data_is_refused_naming_it(tmp_path):
    """Its checkpoint counts the samples it read of its data, cut into sequences and ordered by a seed: on other
    data, Bridge would go on from that count in another stream."""
    from nemo_plrd.bridge.checkpoint import STAGE_FILE
    from nemo_plrd.bridge.stage import prepare_stage

    cfg, save = stage_folder(tmp_path, PlanConfig(keep=0.6))
    record = json.loads((save / STAGE_FILE).read_text()) | {"dataset": {
        "blend": [[data_prefix(tmp_path)], None], "split": cfg.dataset.split, "random_seed": 1234, "seq_length": 64}}
    (save / STAGE_FILE).write_text(json.dumps(record))
    cfg.dataset.random_seed = 99
    with pytest.raises(InputError, match=r"other settings;.*Differences \(then -> now\): dataset.random_seed: 1234 -> "
                                         r"99$"):
        prepare_stage(cfg, hf_path="hf")  # the only difference


def test_a_stage_of_a_family_resumed_in_another_stream_is_refused_an_earlier_record_s_settings_kept(tmp_path):
    """Its checkpoint counts the samples read from its first one: another stream would be another order.
    A record written before a plrd setting existed reads it as its default."""
    from nemo_plrd.bridge.checkpoint import STAGE_FILE
    from nemo_plrd.bridge.stage import prepare_stage

    cfg, save = stage_folder(tmp_path, PlanConfig(keep=0.6), stream=[16, 48])
    record = json.loads((save / STAGE_FILE).read_text())
    record["plrd"].pop("ridge")  # as an earlier nemo-plrd wrote it
    (save / STAGE_FILE).write_text(json.dumps(record))
    cfg.train = dataclasses.replace(cfg.train, first_sample=16, stream_samples=64)  # a family of 4 stages, not 3
    with pytest.raises(InputError, match=r"other settings;.*Differences \(then -> now\): stream: \[16, 48\] -> "
                                         r"\[16, 64\]$"):
        prepare_stage(cfg, hf_path="hf")  # the record's missing plrd.ridge is no difference: listed first if it were


@pytest.mark.parametrize("record, text, error", [
    ("latest_checkpointed_iteration.txt", "abc", "ValueError: invalid literal for int() with base 10: 'abc'"),
    ("latest_train_state.pt", "not a torch save", "UnpicklingError: Weights only load failed):"),
    ("plrd_plan.json", '{"slots": [', "JSONDecodeError: Expecting value"),
    ("plrd_stage.json", "[]", "TypeError: a JSON object was expected, not list"),
    ("run_config.yaml", "train: [", "ParserError: while parsing a flow node")])
def test_a_stage_whose_records_are_damaged_is_refused_naming_the_record(tmp_path, record, text, error):
    """A resumed stage (and the conversion, which reads Bridge's run_config.yaml too) refuses a record it cannot read,
    naming it, before anything is loaded (before: a traceback from the parser, or torch.load's)."""
    from nemo_plrd.bridge.checkpoint import load_bridge_stage
    from nemo_plrd.bridge.stage import prepare_stage

    cfg, save = stage_folder(tmp_path, PlanConfig(keep=0.6))  # the job's own settings: it would resume
    iteration = save / "iter_0000002"
    iteration.mkdir()
    (iteration / "metadata.json").write_text("{}")
    damaged = (iteration if record == "run_config.yaml" else save) / record
    damaged.write_text(text)
    with pytest.raises(InputError, match=re.escape(f"{damaged} is damaged ({error}")):
        if record == "run_config.yaml":
            load_bridge_stage(save, "hf")
        else:
            prepare_stage(cfg, hf_path="hf")
    assert len((save / "metrics.jsonl").read_text().splitlines()) == 3  # refused before anything changed


def test_a_stage_resumed_from_a_checkpoint_copied_short_is_refused_naming_the_shard(tmp_path):
    """Before Bridge loads it (torch's reader failed midway, naming no file); the conversion reads it alike."""
    import torch
    import torch.distributed.checkpoint as dcp

    from nemo_plrd.bridge.checkpoint import load_bridge_stage
    from nemo_plrd.bridge.stage import prepare_stage

    cfg, save = stage_folder(tmp_path, PlanConfig(keep=0.6))  # the job's own settings: it would resume
    iteration = save / "iter_0000002"
    dcp.save({"weight": torch.ones(64)}, checkpoint_id=iteration)  # a shard and its index, as megatron writes them
    (iteration / "metadata.json").write_text("{}")
    shard = next(iteration.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    for read in (lambda: prepare_stage(cfg, hf_path="hf"), lambda: load_bridge_stage(save, "hf")):
        with pytest.raises(InputError, match=re.escape(f"{shard} is cut short (100 of the ")):
            read()


def test_a_stage_started_afresh_keeps_no_metrics_of_a_job_killed_before_its_first_save(tmp_path, tiny_parent):
    """Dropped once the ranks agree that the stage starts afresh (its first pre-wrap hook), not before."""
    from nemo_plrd.bridge.checkpoint import TRACKER
    from nemo_plrd.bridge.stage import StageStart, prepare_stage
    from nemo_plrd.parallel import init_distributed

    cfg, save = stage_folder(tmp_path)
    (save / TRACKER).unlink()  # killed before any checkpoint: the job starts afresh
    prepare_stage(cfg, hf_path=str(tiny_parent))
    assert (save / "metrics.jsonl").read_text().count("\n") == 3
    start = cfg.model._pre_wrap_hooks[0]  # the first hook Bridge runs on the built model
    assert start == StageStart(save, saved=None, indices=cfg.dataset.path_to_cache)
    init_distributed()
    start([])
    assert (save / "metrics.jsonl").read_text() == ""


def test_a_fresh_stage_starts_from_its_parent_never_from_another_run(tmp_path, tiny_parent):
    """A recipe built on Bridge's own sets checkpoint.load: Bridge would load that run into the decomposed model.
    Settings under which the stage would not start from its parent or its own checkpoint are refused."""
    from megatron.bridge.training.config import InProcessRestartConfig

    from nemo_plrd.bridge.checkpoint import PLAN_FILE, TRACKER
    from nemo_plrd.bridge.stage import prepare_stage

    folders = [tmp_path / name for name in ("fresh", "foreign", "pretrained", "inprocess", "step", "finetune")]
    for folder in folders:
        folder.mkdir()
    cfg, save = stage_folder(folders[0])
    (save / TRACKER).unlink()
    cfg.checkpoint.load = str(tmp_path / "another-run")
    prepare_stage(cfg, hf_path=str(tiny_parent))
    assert cfg.checkpoint.load is None
    cfg, save = stage_folder(folders[1])
    (save / PLAN_FILE).unlink()  # a tracker and no plan: a checkpoint another run left there
    with pytest.raises(InputError, match=r"checkpoint.save='.*foreign/stage' holds a checkpoint of a run that is not "
                                         r"a PLRD stage \(no plrd_plan.json\); choose a new checkpoint.save"):
        prepare_stage(cfg, hf_path=str(tiny_parent))
    cfg, _ = stage_folder(folders[2])
    cfg.checkpoint.pretrained_checkpoint = "/elsewhere"
    with pytest.raises(InputError, match="checkpoint.pretrained_checkpoint='/elsewhere': a PLRD stage starts from"):
        prepare_stage(cfg, hf_path=str(tiny_parent))
    cfg, _ = stage_folder(folders[3])  # an in-process restart would train again the way the first attempt decided
    cfg.inprocess_restart = InProcessRestartConfig(enabled=True)
    with pytest.raises(InputError, match="inprocess_restart.enabled=true: a PLRD stage decides once, before "
                                         "training, whether it starts afresh or resumes"):
        prepare_stage(cfg, hf_path=str(tiny_parent))
    cfg, _ = stage_folder(folders[4])  # Bridge would load that step, not the one the metrics are kept for
    cfg.checkpoint.ckpt_step = 2
    with pytest.raises(InputError, match="checkpoint.ckpt_step=2: a PLRD stage resumes from the newest checkpoint"):
        prepare_stage(cfg, hf_path=str(tiny_parent))
    cfg, _ = stage_folder(folders[5])  # Bridge would load the weights alone and train again from step 0
    cfg.checkpoint.finetune = True
    with pytest.raises(InputError, match="checkpoint.finetune=true: Bridge would load a resumed stage's weights alone"):
        prepare_stage(cfg, hf_path=str(tiny_parent))


def test_a_stage_its_conversion_could_not_read_is_refused_before_it_trains(tmp_path, tiny_parent):
    """What Bridge would train but a stage's checkpoint could not become (a nemo-plrd checkpoint, an HF export, the
    next stage's parent), and layouts the stage's own spec or calibration cannot run, each refused naming the key."""
    import json
    import shutil

    from nemo_plrd.bridge.checkpoint import TRACKER
    from nemo_plrd.bridge.stage import prepare_stage

    llama3 = tmp_path / "llama3"  # rope scaling that AutoBridge builds and the conversion refuses
    shutil.copytree(tiny_parent, llama3)
    config = json.loads((llama3 / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 128}
    (llama3 / "config.json").write_text(json.dumps(config))
    cases = [({}, llama3, r"rope scaling .*'llama3'.* is not supported"),
             ({"tensor_model_parallel_size": 4}, tiny_parent,
              r"model.tensor_model_parallel_size=4 must divide the number of KV heads \(2\)"),
             ({"context_parallel_size": 2}, tiny_parent, r"model.context_parallel_size=2: a PLRD stage needs 1"),
             ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, tiny_parent,
              r"plrd.calibration.seq_length=511 must be a multiple of model.tensor_model_parallel_size=2 under "
              r"model.sequence_parallel")]
    for index, (model, parent, message) in enumerate(cases):
        (tmp_path / str(index)).mkdir()
        cfg, save = stage_folder(tmp_path / str(index))
        (save / TRACKER).unlink()  # a fresh start
        cfg.plrd.calibration.seq_length = 511
        for key, value in model.items():
            setattr(cfg.model, key, value)
        with pytest.raises(InputError, match=message):
            prepare_stage(cfg, hf_path=str(parent))


def test_the_plrd_section_may_refer_to_the_rest_of_the_job(tmp_path):
    """As Bridge resolves its YAML: an interpolation in plrd: reads the other sections, and a bad one is named."""
    yaml = tmp_path / "stage.yaml"
    yaml.write_text("plrd:\n  calibration:\n    seq_length: ${dataset.seq_length}\n")
    assert process_plrd_config(container(), yaml).plrd.calibration.seq_length == 64  # the job's dataset.seq_length
    yaml.write_text("plrd:\n  calibration:\n    seq_length: ${dataset.no_such}\n")
    with pytest.raises(InputError, match=r"^plrd: Interpolation key 'dataset.no_such' not found"):
        process_plrd_config(container(), yaml)
