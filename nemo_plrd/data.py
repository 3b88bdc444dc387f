"""Training and calibration data as megatron reads it: indexed datasets and ``GPTDataset``.

``prepare_dataset`` tokenises documents with the parent's tokenizer into megatron's
``.bin`` / ``.idx`` pair (``IndexedDatasetBuilder``), an end-of-document token closing each
document, as megatron's ``preprocess_data.py`` writes them. ``gpt_datasets`` builds megatron's
``GPTDataset`` splits through ``BlendedMegatronDatasetBuilder``: blends with weights, the
train / valid / test split, megatron's document shuffling and sample index, cached by megatron
under ``$PLRD_CACHE/megatron-indices`` (megatron keys them by the prefixes, weights, split, seed and sizes, and
each version of the data files gets a folder of its own; not beside the data, whose folder may be read-only or a
finished asset; jobs sharing it build one at a time, and an index a killed build cut short is built again).
``DataParallelBatches`` hands each data-parallel rank its micro-batches of every global batch in
the order megatron's pretraining sampler does, from a count of consumed samples, so a resumed run
reads exactly the samples the interrupted one would have.

``token_blocks`` cuts a text file into contiguous blocks: the held-out perplexity text of the
reports, which is scored whole and in order rather than sampled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy
import torch
from filelock import FileLock
from tqdm import tqdm

from nemo_plrd.assets import cache_dir
from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.files import fsync, refuse_existing, try_acquire
from nemo_plrd.parallel import rank0_decides

SPLITS = ("train", "valid", "test")
BUILD_POLL = 1.0  # seconds (cache_builder)


def megatron_tokenizer(hf_dir: str | Path):
    """The HF tokenizer in ``hf_dir`` as megatron's datasets take it (``eod``, ``pad``, ``vocab_size``)."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(str(hf_dir), metadata_path={"library": "huggingface"})


JSON_LINES = (".jsonl", ".json")  # megatron's preprocess_data.py reads JSON lines, which HF's to_json writes as .json


def read_documents(path: str | Path, json_key: str = "text") -> Iterator[str]:
    """The documents of a file, read as they are asked for: each line's ``json_key`` of a JSON-lines file
    (``JSON_LINES``); a text file is one document. A missing file is refused now, before any is read."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path} is not a file; give UTF-8 text files or JSON-lines files")
    if path.suffix.lower() in JSON_LINES:
        with path.open("rb") as file:
            if file.read(4096).lstrip().startswith(b"["):  # what json.dump of a list of records writes
                raise InputError(f"{path} holds a JSON array; give JSON lines, one object per line (e.g. "
                                 f"jq -c '.[]' {path} > {path.with_suffix('.jsonl')})")
    return _documents(path, json_key)


def _documents(path: Path, json_key: str) -> Iterator[str]:
    try:
        if path.suffix.lower() not in JSON_LINES:
            yield path.read_text(encoding="utf-8")
            return
        yield from _json_lines(path, json_key)
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text: {error}") from None


def _json_lines(path: Path, json_key: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number} is not a JSON line: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise InputError(f"{path}:{number} has no string field {json_key!r} (--json-key)")
            yield record[json_key]


def prepare_dataset(documents: Iterable[str], tokenizer, prefix: str | Path, progress: bool = False) -> Path:
    """Write ``prefix.bin`` / ``prefix.idx``: each document's token ids and an EOD token.

    Both files are written under temporary names, put on disk and renamed, the index last: a prefix whose
    ``.idx`` exists is complete (a ``.bin`` alone is a killed run's, which the next one replaces). One writer
    at a time holds the prefix's lock, so the temporary names are fixed and a killed run's are written over.
    """
    if tokenizer.eod is None:
        raise InputError("the tokenizer has no end-of-document token (eos_token), which closes each document")
    prefix = Path(prefix)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{prefix}: its folder cannot be made ({error.strerror}: {error.filename})") from None
    with FileLock(prefix.with_name(f".{prefix.name}.lock")):
        _write_dataset(documents, tokenizer, prefix, progress)
    return prefix


TOKENIZER_RECORD = ".tokenizer.json"  # PREFIX.tokenizer.json: which vocabulary wrote PREFIX.bin's ids


@functools.lru_cache(maxsize=4)
def vocabulary_digest(tokenizer) -> str:
    """A digest of a megatron tokenizer's tokens in id order: two tokenizers of one digest write the same ids.
    Kept per tokenizer object (a tenth of a second for SmolLM2's: its vocab list is built anew on each access, and a
    stage checks each prefix of its blend every time it builds datasets)."""
    return hashlib.sha256(json.dumps(tokenizer.vocab).encode()).hexdigest()[:16]


def check_tokenized_by(prefix: str, tokenizer) -> None:
    """A dataset ``plrd prepare-data`` wrote records its tokenizer: one of another vocabulary is refused, whose ids
    would each name another token of the model's (or none). One written elsewhere (megatron's
    preprocess_data.py) records none and is taken as it is."""
    record = Path(f"{prefix}{TOKENIZER_RECORD}")
    if not record.is_file():
        return
    written = json.loads(record.read_text())
    if written["vocabulary"] != vocabulary_digest(tokenizer):
        raise InputError(f"dataset {prefix} was tokenised by {written['tokenizer']} ({written['vocab_size']:,} "
                         f"tokens), whose vocabulary is not the model's ({tokenizer.path}, {len(tokenizer.vocab):,} "
                         f"tokens): prepare it again with `plrd prepare-data --tokenizer {tokenizer.path}`")


def dataset_written(prefix: str | Path) -> bool:
    """A dataset is complete once its ``.idx`` is there (renamed into place last); a ``.bin`` alone is a killed
    run's, which the next one replaces."""
    return Path(f"{prefix}.idx").exists()


def _write_dataset(documents: Iterable[str], tokenizer, prefix: Path, progress: bool) -> None:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    # asked again under the lock: a run that waited for it may find the dataset finished, never rewritten
    refuse_existing(prefix, "dataset", exists=dataset_written)
    tmp = prefix.with_name(prefix.name + ".partial")
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    tokens = 0  # of text, not counting the EOD tokens
    try:
        bar = tqdm(documents, desc=f"tokenising into {prefix.name}", unit="doc", disable=not progress)
        for document in bar:
            ids = tokenizer.tokenize(document)
            builder.add_document(torch.tensor(ids + [tokenizer.eod]), [len(ids) + 1])
            tokens += len(ids)
            bar.set_postfix(tokens=f"{tokens:,}")
        if not tokens:
            raise InputError(f"no text to write into {prefix}: the documents are empty")
        builder.finalize(f"{tmp}.idx")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    Path(f"{tmp}{TOKENIZER_RECORD}").write_text(json.dumps(
        {"tokenizer": str(tokenizer.path), "vocab_size": len(tokenizer.vocab), "vocabulary": vocabulary_digest(tokenizer)}))
    for suffix in (TOKENIZER_RECORD, ".bin", ".idx"):  # the index last: it marks the dataset complete
        fsync(Path(f"{tmp}{suffix}"))
        os.replace(f"{tmp}{suffix}", f"{prefix}{suffix}")
    fsync(prefix.parent)


def blend_lists(blend) -> tuple[list[str], Optional[list[float]]]:
    """``(prefixes, weights)`` in plain lists, whatever sequences a config holds them in (OmegaConf's, tuples):
    what megatron's dataset config takes, and what a stage's record holds, so the two compare as equal."""
    prefixes, weights = blend
    return list(prefixes), None if weights is None else list(weights)


def check_prefix(key: str, prefix: str) -> None:
    """A blend entry must name a prepared dataset (``prefix.bin`` and ``prefix.idx``)."""
    if not (Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()):
        raise InputError(f"{key}: {prefix!r} is not a megatron indexed dataset (no {prefix}.bin / .idx); "
                         "make one with `plrd prepare-data`")


def gpt_datasets(blend: tuple[list[str], Optional[list[float]]], split: str, sequence_length: int,
                 num_samples: Sequence[Optional[int]], tokenizer, seed: int = 1234) -> list:
    """megatron ``GPTDataset`` s (or blends of them) for the train, valid and test splits.

    ``num_samples[i]`` is how many samples split i must provide (megatron repeats epochs to
    reach it); ``None`` skips the split. Every sample holds ``sequence_length`` tokens and
    their shifted labels. Another job's build in the same index cache is waited for (``cache_builder``).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    config = GPTDatasetConfig(random_seed=seed, sequence_length=sequence_length, blend=blend, split=split,
                              tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, create_attention_mask=False,
                              path_to_cache=rank0_decides(lambda: str(index_cache(blend[0]))))  # rank 0 builds
    # megatron loops forever looking for samples in a split with no documents; it builds every split with a
    # share of a weighted blend (one not asked for gets one sample, then is dropped) and of an unweighted blend
    # of several prefixes, which it weights by their splits' sizes, asserting each is at least one sample
    by_size = blend[1] is None and len(blend[0]) > 1
    unasked = ", or none (0) if nothing reads it: megatron builds every split of a weighted blend or one of several"
    for prefix in blend[0]:
        check_tokenized_by(prefix, tokenizer)
        dataset = IndexedDataset(prefix)  # kept while its lengths are read: they are a view of its memory map
        lengths = dataset.sequence_lengths
        for name, wanted, bounds in zip(SPLITS, num_samples, config.split_matrix):
            begin, end = (int(round(bound * len(lengths))) for bound in bounds or (0, 0))
            if not (wanted or (bounds is not None and (blend[1] is not None or by_size))):
                continue
            if end <= begin:
                raise InputError(f"dataset.split={split!r} leaves the {name} split of {prefix} no documents "
                                 f"(it has {len(lengths)}); give that split a larger share{'' if wanted else unasked}")
            if by_size and (tokens := lengths[begin:end].sum()) <= sequence_length:
                raise InputError(f"dataset.split={split!r} leaves the {name} split of {prefix} "
                                 f"{tokens} tokens, not one sample of {sequence_length}; give that "
                                 f"split a larger share{'' if wanted else unasked}, or the prefixes weights")
    sizes = [1 if wanted is None and blend[1] is not None else wanted for wanted in num_samples]
    with cache_builder(config.path_to_cache):
        splits = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    for name, wanted, split in zip(SPLITS, num_samples, splits):
        if wanted and len(split) < wanted:  # megatron repeats no epoch of an unweighted blend of several prefixes
            raise InputError(f"dataset.blend={[blend[0], blend[1]]} gives the {name} split {len(split)} samples of "
                             f"{sequence_length} tokens, fewer than the {wanted} asked for; give the prefixes weights")
    return [None if wanted is None else split for split, wanted in zip(splits, num_samples)]


def index_cache(prefixes: Sequence[str]) -> Path:
    """megatron's index cache for a blend of ``prefixes``. megatron keys its indices by a prefix's path, not its
    contents: a dataset written again at the same path would be read through the old one's indices (samples
    past its end, or other documents), so each version of the files (their sizes and times) has its own folder."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            stat = os.stat(f"{prefix}{suffix}")
            digest.update(f"{os.path.abspath(prefix)}{suffix} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return cache_dir() / "megatron-indices" / digest.hexdigest()[:16]


@contextmanager
def cache_builder(folder: str) -> Iterator[None]:
    """Rank 0's hold on megatron's index cache ``folder`` while it builds (megatron's rank 0 builds and
    writes, the other ranks wait for it, then read): jobs sharing the cache build one at a time, so
    the torn files dropped first can only be a killed build's, never another job's being written.
    Another job's build is waited for as long as it takes, in rounds of ``BUILD_POLL`` seconds that
    every rank joins (rank 0's try for the lock, broadcast): ranks waiting in one collective instead
    would time out after the process group's timeout, without a word of why."""
    lock = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        Path(folder).mkdir(parents=True, exist_ok=True)
        lock = FileLock(Path(folder) / ".build.lock")
    waiting = False
    while not rank0_decides(lambda: try_acquire(lock, BUILD_POLL)):
        if lock is not None and not waiting:
            print(f"[data] waiting for another job's build of megatron's indices in {folder}", file=sys.stderr,
                  flush=True)
            waiting = True
    try:
        if lock is not None:
            drop_torn_indices(Path(folder))
        yield
    finally:
        if lock is not None:
            lock.release()


def drop_torn_indices(folder: Path) -> None:
    """Delete the index files in megatron's cache ``folder`` that a killed build cut short.

    megatron writes its cached indices straight to their final names, and takes a split whose
    files all exist for a finished one: a run killed during its last ``numpy.save`` would leave
    an index that every later run with the same data settings fails to load. Without the torn
    file, megatron builds that split's indices again.
    """
    for path in folder.glob("*.npy"):
        try:
            numpy.load(path, mmap_mode="r")  # reads the header and maps the data: no pass over it
        except (ValueError, OSError, EOFError):
            path.unlink(missing_ok=True)


def calibration_batches(dataset, samples: int, micro_batch: int) -> list[torch.Tensor]:
    """The first ``samples`` token sequences of ``dataset`` in batches [micro_batch, s] (the last may be smaller)."""
    return [torch.stack([dataset[i]["tokens"] for i in range(start, min(start + micro_batch, samples))])
            for start in range(0, samples, micro_batch)]


def token_samples(tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """GPTDataset-shaped samples (tokens, labels, loss mask) from rows of ``tokens`` [n, s+1]: the
    synthetic data of the demo and the tests, read through the same batches as real data."""
    return [{"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(row.numel() - 1)} for row in tokens]


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of samples; a blend's samples also carry their dataset's index (a numpy integer)."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


@dataclass(frozen=True)
class DataParallelBatches:
    """Megatron's pretraining order: global batch g is samples [g * global_batch, (g + 1) * global_batch)
    after ``first_sample``; micro-batch m of data-parallel rank d holds the ``micro_batch`` samples from
    m * micro_batch * dp_size + d * micro_batch on."""

    dataset: object
    micro_batch: int
    global_batch: int
    dp_rank: int
    dp_size: int
    first_sample: int = 0  # the samples before it were read by an earlier run (a family's earlier stages)

    def __post_init__(self) -> None:
        if self.global_batch % (self.micro_batch * self.dp_size):
            raise InputError(f"the global batch {self.global_batch} is not a multiple of micro batch "
                             f"{self.micro_batch} x data-parallel size {self.dp_size}")

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def micro_batches(self, consumed: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch that starts after ``consumed`` samples."""
        stride, first = self.micro_batch * self.dp_size, self.first_sample + consumed
        starts = (first + m * stride + self.dp_rank * self.micro_batch for m in range(self.num_micro_batches))
        return [collate([self.dataset[i] for i in range(start, start + self.micro_batch)]) for start in starts]


def token_blocks(path: str | Path, tokenizer, block_length: int, num_blocks: int, start_block: int = 0) -> torch.Tensor:
    """[num_blocks, block_length] token ids: blocks start_block .. start_block + num_blocks - 1 of the file."""
    ids = tokenizer(Path(path).read_text(), return_tensors="pt").input_ids[0]
    available = ids.numel() // block_length
    if start_block + num_blocks > available:
        raise InputError(f"{path} holds {available} blocks of {block_length} tokens; asked for blocks "
                         f"{start_block}..{start_block + num_blocks - 1}")
    return ids[start_block * block_length:(start_block + num_blocks) * block_length].view(num_blocks, block_length)
