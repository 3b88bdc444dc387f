"""A PLRD family whose stages are Megatron-Bridge jobs (``recipes/run_plrd.py``), one cluster job each.

Read without Bridge (no Bridge import here): ``plrd plan`` and ``plrd submit`` run on a login
node or a laptop. Stage k writes ``OUTPUT/stage{k}-{size}.partial/`` (the Bridge job's
``checkpoint.save`` in ``bridge/``, the nemo-plrd checkpoint in ``checkpoint/``, HF exports,
lm-eval) and renames it to ``OUTPUT/stage{k}-{size}/`` when all of it is done, so a stage
whose folder exists is complete, and stage k+1 starts from its ``checkpoint/``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_plrd.bridge import recipe_function
from nemo_plrd.config import (PLRDConfig, TrainConfig, check_blend, check_distillation, check_export,
                              distils_from_family_parent, from_dict, load_yaml, override_key, with_overrides)
from nemo_plrd.errors import InputError
from nemo_plrd.evaluate import EvalConfig
from nemo_plrd.export_options import check_dtype
from nemo_plrd.model import LlamaArch

SET_BY_FAMILY = ("checkpoint.save", "dataset.blend", "plrd.plan.keep", "plrd.plan.target_params", "plrd.plan.ranks",
                 "train.first_sample", "train.stream_samples")


# In a quoted Hydra string only backslashes before a quote, an interpolation or the closing quote escape
_HYDRA_ESCAPES = re.compile(r'(\\*)("|\$\{|$)')


def hydra_value(value: Any) -> str:
    """``value`` as a Hydra override's value: strings double-quoted (a path may hold ``,`` ``=`` ``(`` ``#``,
    a backslash or ``${``), lists as lists, None as null; Hydra reads back exactly ``value``."""
    if isinstance(value, str):
        return '"' + _HYDRA_ESCAPES.sub(lambda m: m[1] * 2 + (f"\\{m[2]}" if m[2] else ""), value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(hydra_value, value)) + "]"
    return json.dumps(value)


@dataclass
class JobConfig:
    """Every stage's Bridge job: the recipe function, a YAML applied over it, then overrides (Hydra syntax)."""

    recipe: str = "nemo_plrd.bridge.recipe:llama_stage"
    config_file: Optional[str] = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        recipe_function(self.recipe, "job.recipe")
        taken = [line for line in self.overrides if override_key(line) in SET_BY_FAMILY]
        if taken:
            raise InputError(f"job.overrides {taken} cannot be set: the family sets each stage's "
                             f"{', '.join(SET_BY_FAMILY)}")
        data_path = self.get("dataset.data_path")
        if data_path is not None:  # the stage would take the family's blend and leave it unread
            raise InputError(f"dataset.data_path={data_path!r} (job.config_file or job.overrides): a family's "
                             "stages read its blend; give the data there (blend: [[PREFIX, ...], null])")

    @functools.cached_property
    def settings(self) -> DictConfig:
        """The job's YAML with the overrides applied, read once: what ``plrd plan`` reads the training budget from."""
        data = load_yaml(self.config_file) if self.config_file else OmegaConf.create({})
        return with_overrides(data, self.overrides)

    def get(self, key: str, default: Any = None) -> Any:
        """``key`` as the job's YAML and overrides set it; ``default`` where they do not, or where it interpolates
        a key only the recipe function sets (read by Bridge's job alone)."""
        try:
            return OmegaConf.select(self.settings, key, default=default)
        except OmegaConfBaseException:
            return default

    def setting(self, key: str, default: Any = None) -> Any:
        value = self.get(key, default)
        if value is None:
            raise InputError(f"{key} must be set in job.config_file or job.overrides, to a value (not one "
                             "interpolated from a key the recipe function sets): the recipe function's default is "
                             "not read without Bridge, and the plan needs it")
        return value

    def count(self, key: str, default: Optional[int] = None) -> int:
        """``setting(key)``, which the plan computes with: a whole number >= 1, else refused naming the key."""
        value = self.setting(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{key}={value!r} (job.config_file or job.overrides) must be a whole number >= 1")
        return value


@dataclass
class BridgeFamilyConfig:
    """``plrd plan`` / ``plrd submit``: one Bridge stage per entry of ``target_params`` (whole-model parameters)."""

    parent: str  # the HF model directory, as the cluster's nodes see it
    output: str
    target_params: list[int]  # strictly decreasing, each below the parent's
    blend: Optional[list] = None  # [prefixes, weights]: the stages' megatron indexed datasets (dataset.blend)
    job: JobConfig = field(default_factory=JobConfig)
    architecture: Optional[str] = None  # an HF config.json (or its folder) to plan from; default: the parent's
    export: list[str] = field(default_factory=lambda: ["merged"])
    export_dtype: str = "float32"  # the exports' weights: float32, bfloat16, float16 or parent (the parent's own)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.target_params or min(self.target_params) < 1 or any(
                later >= earlier for earlier, later in zip(self.target_params, self.target_params[1:])):
            raise InputError(f"target_params={self.target_params} must list one or more parameter counts (whole "
                             "numbers >= 1), strictly decreasing (each stage smaller than the one before)")
        if self.blend is not None:
            check_blend("blend", self.blend)  # the files are on the cluster: submit looks for them
        check_export(self.export, at_least_one="the next stage starts from the checkpoint, the evaluation from "
                                               "the first export")
        check_dtype("export_dtype", self.export_dtype)
        self._check_job_plrd_settings()

    def _check_job_plrd_settings(self) -> None:
        """The job's ``plrd.*`` and loss keys, as each stage's job will read them, checked at submission: a typo
        would otherwise surface only when the first job starts, after the queue. Settings that interpolate
        Bridge's own keys are left to the job."""
        try:
            settings = OmegaConf.to_container(self.job.settings, resolve=True)
        except OmegaConfBaseException:
            return
        plrd = settings.get("plrd") or {}
        if not isinstance(plrd, dict) or not isinstance(plrd.get("plan", {}), dict):
            raise InputError(f"job: plrd={plrd!r} must be a mapping, its plrd.plan too")
        plan = {**plrd.get("plan", {}), "keep": None, "ranks": None, "target_params": self.target_params[0]}
        try:
            from_dict(PLRDConfig, {**plrd, "plan": plan}, "plrd.")
            train = settings.get("train") or {}
            check_distillation(*(train.get(key, getattr(TrainConfig, key)) for key in ("loss", "kd_weight", "teacher")),
                               teacher_here=False)
        except InputError as error:
            raise InputError(f"job (job.config_file, job.overrides): {error}") from None

    def stage_name(self, index: int) -> str:
        size = self.target_params[index]
        return f"stage{index + 1}-" + (f"{size / 1e9:.3g}b" if size >= 1e9 else f"{size / 1e6:.3g}m")

    def stage_folder(self, index: int) -> Path:
        return Path(self.output) / self.stage_name(index)

    @property
    def tensor_parallel_size(self) -> int:
        return self.job.count("model.tensor_model_parallel_size")

    def hf_config(self, index: int) -> str:
        """The HF config and tokenizer stage ``index`` starts from (a PLRD checkpoint carries its parent's)."""
        return self.parent if index == 0 else str(self.stage_folder(index - 1) / "checkpoint" / "hf")

    def starts_from(self, index: int) -> tuple[str, str]:
        """Stage ``index``'s parent, as its record names it: ``hf_path``, the HF model, or ``parent``, the previous
        stage's checkpoint."""
        return ("hf_path", self.parent) if index == 0 else ("parent", str(self.stage_folder(index - 1) / "checkpoint"))

    def start(self, index: int) -> list[str]:
        """``recipes/run_plrd.py``'s parent arguments (``--hf-path`` or ``--parent``)."""
        key, path = self.starts_from(index)
        return [f"--{key.replace('_', '-')}", path]

    def stage_overrides(self, index: int, save: Path) -> list[str]:
        """The job's overrides, then what the family sets for stage ``index``: its data, where in the stream it
        starts (after the samples of the stages before it), its size and its checkpoints."""
        prefixes, weights = self.blend or ([], None)
        distilled = distils_from_family_parent(self.job.settings)
        samples = self.stage_samples()
        return [*self.job.overrides, f"dataset.blend={hydra_value([prefixes, weights])}",
                f"train.first_sample={index * samples}", f"train.stream_samples={len(self.target_params) * samples}",
                "plrd.plan.keep=null", "plrd.plan.ranks=null",  # the job's YAML may set either for one stage
                f"plrd.plan.target_params={self.target_params[index]}", f"checkpoint.save={hydra_value(str(save))}",
                *([f"train.teacher={hydra_value(self.parent)}"] if distilled else [])]  # a later stage knows only --parent

    def plan_request(self, index: int) -> dict[str, Any]:
        plan = self.job.get("plrd.plan", {})
        return {"target_params": self.target_params[index], "allocation": plan.get("allocation", "uniform"),
                "multiple": plan.get("multiple", 8)}

    def architecture_path(self) -> Path:
        """The folder of the HF config.json the plan is made from (``architecture``, else ``parent``)."""
        key, value = ("architecture", self.architecture) if self.architecture else ("parent", self.parent)
        path = Path(value).parent if Path(value).name == "config.json" else Path(value)
        if not (path / "config.json").is_file():
            raise InputError(f"{key}={value!r} holds no HF config.json to plan the family from; give an HF model "
                             "directory or its config.json" + ("" if self.architecture else " as architecture="))
        return path

    def arch(self) -> LlamaArch:
        """The parent's architecture, read from ``architecture_path()``."""
        from nemo_plrd.hf import hf_arch

        return hf_arch(self.architecture_path())

    def stage_samples(self) -> int:
        """Each stage's training samples, from the job's settings."""
        return self.job.count("train.train_iters") * self.job.count("train.global_batch_size")

    def train_tokens(self) -> tuple[int, int]:
        """(training tokens per stage, sequence length), from the job's settings."""
        seq_length = self.job.count("dataset.seq_length")
        return self.stage_samples() * seq_length, seq_length
