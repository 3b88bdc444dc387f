"""What an HF export can be asked for, importable without torch: ``conversion/megatron_to_hf.py``'s
command line offers it before anything heavy loads, and the configs check it as ``export_hf`` does."""

from nemo_plrd.errors import InputError

FORMATS = ("merged", "factored")  # merged: the parent's own HF class; factored: U and V, with their modeling code
DTYPES = ("float32", "bfloat16", "float16", "parent")  # parent: the dtype the parent's config.json names


def check_dtype(key: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise InputError(f"{key}={dtype!r} is not one of {list(DTYPES)}")
