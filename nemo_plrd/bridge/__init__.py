"""A PLRD stage as a Megatron-Bridge pretraining job.

``nemo_plrd.bridge.config`` puts the stage's ``plrd:`` section on Bridge's ``ConfigContainer``;
its modules import Bridge, this package does not, so ``nemo_plrd`` works without Bridge.
"""

import importlib
import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from nemo_plrd.errors import InputError

# The oldest Megatron-Bridge whose API the stage uses (0.5 has no get_model_chunk_vp_stage, and its
# get_batch returns another tuple); checked: 0.6.2.
OLDEST_BRIDGE = "0.6.0"


def require_bridge(installed: str | None = None) -> None:
    """Refuse an older Megatron-Bridge before it fails on an import deep in the stage."""
    from packaging.version import Version

    if installed is None:
        try:
            installed = version("megatron-bridge")
        except PackageNotFoundError:
            raise InputError("a Bridge stage needs megatron-bridge (tests/bridge/constraints.txt: the checked "
                             "versions; README, 'On a cluster')") from None
    if Version(installed) < Version(OLDEST_BRIDGE):
        raise InputError(f"megatron-bridge {installed} is installed; a Bridge stage needs {OLDEST_BRIDGE} or newer "
                         "(the NeMo 26.06 container carries 0.5.0; tests/bridge/constraints.txt lists the versions "
                         "checked: megatron-bridge 0.6.2, megatron-core 0.19.2)")


def check_stage_parallelism(pipeline: int, context: int) -> None:
    """A stage's calibration runs the whole model layer by layer in one process, and its layer spec's attention
    is megatron's local one, which has no context-parallel path: refused where the job is submitted and where it
    starts (docs/scale.md)."""
    if pipeline != 1:
        raise InputError(f"model.pipeline_model_parallel_size={pipeline}: a PLRD stage needs 1 (its calibration runs "
                         "the whole model layer by layer in one process; docs/scale.md)")
    if context != 1:
        raise InputError(f"model.context_parallel_size={context}: a PLRD stage needs 1 (its layers' local attention "
                         "has no context-parallel path; docs/scale.md)")


def recipe_function(recipe: str, key: str) -> tuple[str, str]:
    """``recipe``'s module and function, refused (as ``key``) unless it is ``MODULE:FUNCTION``: checked where it
    is named, so a family's submission refuses what its stage jobs would."""
    module, colon, function = recipe.partition(":")
    if not (module and colon and function) or ":" in function:
        raise InputError(f"{key}={recipe!r} must be MODULE:FUNCTION, e.g. nemo_plrd.bridge.recipe:llama_stage")
    return module, function


def load_recipe(recipe: str, key: str) -> Callable[..., Any]:
    """``recipe``'s function, which a stage calls as ``function(hf_path=...)``: a name that does not import, or a
    function that takes no ``hf_path``, is refused as ``key`` before the job starts."""
    module, function = recipe_function(recipe, key)
    try:
        make = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise InputError(f"{key}={recipe!r} cannot be loaded: {error}") from None
    try:
        inspect.signature(make).bind(hf_path="")
    except (TypeError, ValueError):
        raise InputError(f"{key}={recipe!r} must be a function taking hf_path=, the parent's HF folder, as "
                         "nemo_plrd.bridge.recipe:llama_stage does") from None
    return make
