"""The ``plrd:`` section on Megatron-Bridge's ``ConfigContainer``, read as Bridge reads the rest.

YAML and ``key=value`` overrides go through Bridge's own ``process_config_with_overrides``, so
``plrd.plan.keep=0.4`` is an override like ``train.train_iters=100``. Bridge skips keys it does
not know (with a log warning; a YAML file's unknown keys are refused here, by name) and sets values
without checking their types; the project's validator (``nemo_plrd.config.from_dict``) therefore
reads the same YAML section and overrides first, refusing an unknown or ill-typed ``plrd.*`` key by
its full name before Bridge runs, and checks Bridge's result again. Bridge's ``train:`` section gains the local stage's loss keys
(``train.loss``, ``train.kd_weight``, ``train.teacher``) and stream keys (``train.first_sample``,
``train.stream_samples``: where a family's stage starts in the data), checked the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from megatron.bridge.training.config import ConfigContainer, TrainingConfig
from megatron.bridge.training.utils.omegaconf_utils import create_omegaconf_dict_config, process_config_with_overrides
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_plrd.config import (PLRDConfig, check_distillation, check_stream, from_dict, load_yaml, override_key,
                              with_overrides)
from nemo_plrd.errors import InputError

Config = TypeVar("Config")


DISTILLATION = ("loss", "kd_weight", "teacher")  # train's keys that say what a stage's loss is


@dataclass(kw_only=True)
class PLRDTrainingConfig(TrainingConfig):
    """Bridge's training loop with the local stage's loss keys (``nemo_plrd.config.TrainConfig``), so
    ``train.loss=kd`` means the same in both: the LM loss, logit distillation or both."""

    loss: str = "lm"  # lm (next-token cross entropy), kd (KL to the teacher's logits) or lm+kd
    kd_weight: float = 1.0  # lm+kd: lm + kd_weight x kd
    teacher: str = "parent"  # parent (stage 1's HF parent), previous (this stage's parent) or a model directory
    first_sample: int = 0  # where in the data this stage starts (a family's stage k: where stage k-1 stopped)
    stream_samples: Optional[int] = None  # the samples megatron orders (None: up to this stage's last)

    @property
    def in_stream(self) -> bool:
        return self.first_sample != 0 or self.stream_samples is not None


@dataclass(kw_only=True)
class PLRDConfigContainer(ConfigContainer):
    """Bridge's whole job config plus how the stage decomposes."""

    plrd: PLRDConfig


def _promoted(cfg: Any, subclass: type[Config], **more: Any) -> Config:
    """Bridge's config dataclass ``cfg`` as ``subclass``, nemo-plrd's extension of its type, every field kept."""
    return subclass(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}, **more)


def with_plrd(cfg: ConfigContainer, plrd: PLRDConfig) -> PLRDConfigContainer:
    """A Bridge recipe's ``ConfigContainer`` (e.g. from ``megatron.bridge.recipes``) with ``plrd`` added and its
    ``train`` taking the stage's keys: what a ``--recipe`` function of ``recipes/run_plrd.py`` built on one of
    Bridge's returns."""
    return _with_stage_training(_promoted(cfg, PLRDConfigContainer, plrd=plrd))


def _with_stage_training(cfg: PLRDConfigContainer) -> PLRDConfigContainer:
    if not isinstance(cfg.train, PLRDTrainingConfig):  # Bridge's own: Bridge would skip train.loss
        cfg.train = _promoted(cfg.train, PLRDTrainingConfig)
    return cfg


def process_plrd_config(cfg: PLRDConfigContainer, config_file: Optional[str | Path] = None,
                        overrides: Sequence[str] = ()) -> PLRDConfigContainer:
    """``cfg`` with the YAML file and overrides applied by Bridge, its ``plrd`` section validated."""
    if not isinstance(cfg, PLRDConfigContainer):
        raise InputError(f"the recipe returned a {type(cfg).__name__}, not a PLRDConfigContainer: "
                         "nemo_plrd.bridge.config.with_plrd(cfg, PLRDConfig(...)) adds the plrd section to a "
                         "Bridge recipe's ConfigContainer")
    cfg = _with_stage_training(cfg)
    job = create_omegaconf_dict_config(cfg)[0]  # the whole job, as Bridge reads it: plrd.* may refer to any section
    if config_file is not None:
        loaded = load_yaml(config_file)  # a missing file, a folder or a list refused by name, not by Bridge's traceback
        sections = {key: value for key, value in OmegaConf.to_container(loaded).items() if key != "plrd"}  # below
        unknown = _unknown_keys(cfg, sections)
        if unknown:  # e.g. train.los: kd would train with the LM loss
            raise InputError(f"{config_file}: {', '.join(unknown)} is not a setting of the job (Bridge would skip it "
                             "with a warning); correct the name")
        job = OmegaConf.merge(job, loaded)
    ours = [line for line in overrides if override_key(line).split(".")[0] == "plrd"]
    with_overrides(job, ours)
    try:
        plrd = OmegaConf.to_container(job.plrd, resolve=True)
    except OmegaConfBaseException as error:
        raise InputError(f"plrd: {error}") from None
    from_dict(PLRDConfig, plrd, "plrd.")  # before Bridge: an unknown plrd key named with the keys allowed
    OmegaConf.set_struct(job, True)  # the rest as Bridge applies them, but a key the job lacks named by its override
    with_overrides(job, [line for line in overrides if line not in ours])
    cfg = process_config_with_overrides(cfg, config_file and str(config_file), list(overrides))
    cfg.plrd = from_dict(PLRDConfig, dataclasses.asdict(cfg.plrd), "plrd.")  # and what Bridge made of it
    check_distillation(cfg.train.loss, cfg.train.kd_weight, cfg.train.teacher)
    if cfg.train.in_stream:
        _check_stream(cfg)
    return cfg


def _unknown_keys(config: Any, section: dict, prefix: str = "") -> list[str]:
    """The keys of a YAML ``section`` that ``config`` lacks: those Bridge's override walk skips."""
    unknown = []
    for key, value in section.items():
        if not hasattr(config, key):
            unknown.append(f"{prefix}{key}")
        elif isinstance(value, dict) and "_target_" not in value and dataclasses.is_dataclass(getattr(config, key)):
            unknown += _unknown_keys(getattr(config, key), value, f"{prefix}{key}.")
    return unknown


def _check_stream(cfg: PLRDConfigContainer) -> None:
    """The Bridge settings a stage reading from ``train.first_sample`` on can honour (``nemo_plrd.bridge.stage.StageStream``)."""
    train = cfg.train
    samples = train.train_samples or (train.train_iters or 0) * train.global_batch_size
    check_stream(train.first_sample, train.stream_samples, samples,
                 "train.train_samples" if train.train_samples else "train.train_iters x train.global_batch_size")
    if cfg.dataset.dataloader_type != "single":  # 'cyclic' shuffles per data-parallel bucket: another order
        raise InputError(f"dataset.dataloader_type={cfg.dataset.dataloader_type!r} with train.first_sample: a stage "
                         "reads the stream in megatron's order, from the 'single' pretraining sampler")
    for key in ("rampup_batch_size", "num_epochs"):
        if getattr(train, key, None) is not None:
            raise InputError(f"train.{key}={getattr(train, key)} with train.first_sample: a stage continuing the "
                             "stream would start its ramp-up or epochs at the stream's count; leave it unset")
