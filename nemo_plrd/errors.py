"""The project's refusals of bad input, told apart from bugs.

A recipe, conversion script or ``plrd`` command prints an ``InputError`` as one line and exits
with status 2: the user gave a key, value, path or model the project does not accept, and the
message names it. Every other exception is a bug somewhere (here, or in torch, transformers or
megatron) and keeps its traceback. Each class also derives from the built-in exception a
caller of the library would catch (``ValueError``, ``FileNotFoundError``, ``FileExistsError``).
"""


class InputError(ValueError):
    """A config key or value, an argument or a model that is refused, with what is allowed."""


class MissingInputError(InputError, FileNotFoundError):
    """An input path that does not hold what it should (a config file, a checkpoint, an HF model)."""


class OutputExistsError(InputError, FileExistsError):
    """An output path that is taken: outputs are never overwritten."""


def check_positive(section: str, **values: int | None) -> None:
    """Refuse a count below 1, named as its config key (``section.name``); None (no limit) passes."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise InputError(f"{section}.{name}={value} must be a positive integer")
