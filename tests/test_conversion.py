"""conversion/ scripts on the real SmolLM2-135M: an exact round trip, and bad input refused cleanly."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from nemo_plrd.assets import smollm2_135m
from nemo_plrd.checkpoint import describe_parent
from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.evaluate import hf_model_dir
from nemo_plrd.hf import SafetensorsWeights, to_megatron
from tiny_llama import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def conversion(name: str) -> Path:
    return ROOT / "conversion" / f"{name}.py"


def script(name: str, *args, nproc: int = 1) -> subprocess.CompletedProcess:
    path = str(conversion(name))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--nproc_per_node", str(nproc)]
    return subprocess.run([*launcher, path, *map(str, args)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def parent():
    return smollm2_135m()


def test_smollm2_round_trip_through_megatron_is_exact(parent, tmp_path):
    """Imported at TP=3 (SmolLM2's 3 KV heads allow 1 or 3), exported at TP=1: resharded on load."""
    imported = script("hf_to_megatron", parent, tmp_path / "ckpt", nproc=3)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "134,515,008 parameters, TP=3" in imported.stdout
    exported = script("megatron_to_hf", tmp_path / "ckpt", tmp_path / "hf", "--format", "merged")
    assert exported.returncode == 0, exported.stderr[-3000:]

    original, back = (safetensors.torch.load_file(path / "model.safetensors") for path in (parent, tmp_path / "hf"))
    assert original.keys() == back.keys() and all(torch.equal(back[name], original[name]) for name in original)
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    logits = [transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits
              for path in (parent, tmp_path / "hf")]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("To be").input_ids == \
        transformers.AutoTokenizer.from_pretrained(parent)("To be").input_ids


def test_a_tied_checkpoint_that_holds_the_output_layer_alone_imports_as_transformers_loads_it(tmp_path):
    """Tied weights saved under lm_head.weight only (as some converters write them): transformers ties the
    embedding to it, and so does the import."""
    both, alone = save_tiny_llama(tmp_path / "both"), tmp_path / "alone"
    shutil.copytree(both, alone)
    weights = safetensors.torch.load_file(both / "model.safetensors")
    assert "lm_head.weight" not in weights  # transformers saves the embedding
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    safetensors.torch.save_file(weights, alone / "model.safetensors", metadata={"format": "pt"})
    tokens = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = [transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits
              for path in (both, alone)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    arch = describe_parent(both)[0]
    expected = to_megatron(SafetensorsWeights(both), arch)
    imported = to_megatron(SafetensorsWeights(alone), arch)
    assert imported.keys() == expected.keys() and all(torch.equal(imported[k], expected[k]) for k in expected)


def test_an_hf_folder_without_weights_or_with_a_config_that_is_not_one_is_refused_naming_it(tmp_path, script_here):
    """A PLRD checkpoint's hf/ (config and tokenizer only) given as a parent, a model to evaluate or to import."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(save_tiny_llama(tmp_path / "tiny") / "config.json", config_only)
    for check in (describe_parent, hf_model_dir):
        with pytest.raises(MissingInputError, match=f"{config_only} has an HF config but no weights"):
            check(config_only)
    assert_refused(script_here(conversion("hf_to_megatron"), config_only, tmp_path / "out"),
                   "has an HF config but no weights", tmp_path / "out")
    for text, message in (('{"hidden_size": 64}', "config.json names no model_type: not an HF model's config"),
                          ("not json", "config.json is not an HF model's config (a JSON mapping)"),
                          ("[1]", "config.json is not an HF model's config (a JSON mapping)"),
                          ('{"model_type": ["llama"]}', "config.json names no model_type"),
                          ('{"model_type": "foo_bar"}',
                           "config.json names model_type 'foo_bar', which this transformers does not know")):
        (config_only / "config.json").write_text(text)
        for check in (describe_parent, hf_model_dir):
            with pytest.raises(ValueError, match=re.escape(message)):
                check(config_only)
    # a model with its own code (auto_map) is one plrd eval loads (trust_remote_code), never a parent
    (config_only / "config.json").write_text('{"model_type": "foo_bar", "auto_map": {"AutoConfig": "foo.FooConfig"}}')
    with pytest.raises(ValueError, match="config.json names model_type 'foo_bar', which this transformers does not"):
        describe_parent(config_only)
    with pytest.raises(MissingInputError, match="has an HF config but no weights"):
        hf_model_dir(config_only)  # its config passed


def assert_refused(result, message: str, out: Path, torchrun: bool = False) -> None:
    """Refused as bad input: the message and exit status 2, no traceback (torchrun reports a failed worker as 1,
    with its own)."""
    assert result.returncode == (1 if torchrun else 2), result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert torchrun or "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_bad_input_is_refused_and_nothing_is_written(parent, tmp_path, script_here):
    out = tmp_path / "out"
    assert_refused(script_here(conversion("hf_to_megatron"), tmp_path / "missing", out),
                   "is not a Hugging Face model directory (no config.json)", out)
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert_refused(script_here(conversion("hf_to_megatron"), tmp_path / "gpt2", out),
                   "architecture 'gpt2' is not supported; supported: ('llama', 'mistral', 'qwen2')", out)
    (tmp_path / "factored").mkdir()  # an hf-factored export's config: its own model type, its code named
    (tmp_path / "factored" / "config.json").write_text(json.dumps(
        {"model_type": "plrd_llama", "auto_map": {"AutoConfig": "modeling_plrd.PLRDLlamaConfig"}}))
    assert_refused(script_here(conversion("hf_to_megatron"), tmp_path / "factored", out),
                   "is a factored export (model_type 'plrd_llama'), for inference: start from the stage's", out)
    assert_refused(script("hf_to_megatron", parent, out, nproc=2),
                   "torchrun --nproc_per_node=2 must divide the number of KV heads (3)", out, torchrun=True)
    assert_refused(script_here(conversion("megatron_to_hf"), tmp_path / "missing", out),
                   "is not a megatron dist_checkpointing checkpoint", out)


@pytest.mark.parametrize("name, what", [("hf_to_megatron", "checkpoint directory"),
                                        ("megatron_to_hf", "HF model directory"),
                                        ("bridge_to_plrd", "checkpoint directory")])
def test_an_existing_output_is_refused_before_anything_loads(tmp_path, script_here, name, what):
    """Its input is missing too: refused for the output first, so nothing was read (at 70B, hours)."""
    taken = tmp_path / "taken"
    taken.mkdir()
    extra = ["--hf-path", tmp_path / "missing"] if name == "bridge_to_plrd" else []
    result = script_here(conversion(name), tmp_path / "missing", taken, *extra)
    assert result.returncode == 2 and f"{what} {taken} already exists; choose a new path" in result.stderr
    assert not list(taken.iterdir())
    (tmp_path / "file").write_text("")  # an output below a file
    result = script_here(conversion(name), tmp_path / "missing", tmp_path / "file" / "out", *extra)
    assert result.returncode == 2 and f"{what} {tmp_path / 'file' / 'out'} cannot be made: {tmp_path / 'file'} is a " \
                                      "file, not a folder" in result.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny LLaMA imported by hf_to_megatron.py, for the tests to copy and damage."""
    folder = tmp_path_factory.mktemp("tiny")
    imported = script("hf_to_megatron", save_tiny_llama(folder / "hf"), folder / "ckpt")
    assert imported.returncode == 0, imported.stderr[-3000:]
    return folder / "ckpt"


def test_a_checkpoint_without_its_hf_config_is_refused_before_its_weights_load(tiny_checkpoint, tmp_path, script_here):
    ckpt, out = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"), tmp_path / "out"
    shutil.rmtree(ckpt / "hf")
    assert_refused(script_here(conversion("megatron_to_hf"), ckpt, out), f"{ckpt} has no hf/config.json", out)
    with pytest.raises(MissingInputError, match=f"{ckpt} has no hf/config.json"):  # as a stage's parent or teacher
        describe_parent(ckpt)


def test_a_checkpoint_whose_parent_has_no_tokenizer_is_refused_before_its_weights_are_gathered(tiny_checkpoint,
                                                                                              tmp_path):
    """An HF model is exported with its parent's tokenizer: without one, refused before the export's work."""
    ckpt, out = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"), tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / "hf" / name).unlink()
    assert_refused(script("megatron_to_hf", ckpt, out), f"{ckpt / 'hf'} holds no tokenizer transformers can load", out)
    with pytest.raises(MissingInputError, match=f"{ckpt / 'hf'} holds no tokenizer"):  # as a stage's parent or teacher
        describe_parent(ckpt)


def test_an_hf_model_without_a_tokenizer_or_with_a_larger_one_is_refused_naming_it_before_any_work(tmp_path,
                                                                                                  script_here,
                                                                                                  plrd_here):
    """As a stage's parent or teacher, by plrd eval, hf_to_megatron.py and plrd prepare-data (before: transformers'
    ValueError once the weights had loaded, or, with another model's larger tokenizer, the embedding's IndexError
    in the first forward; hf_to_megatron.py wrote a checkpoint that no export could read)."""
    without = save_tiny_llama(tmp_path / "without")
    (without / "tokenizer.json").unlink()  # tokenizer_config.json alone
    larger = save_tiny_llama(tmp_path / "larger", vocab_size=1000)
    out = tmp_path / "out"
    for model, message in ((without, f"{without} holds no tokenizer transformers can load"),
                           (larger, f"{larger}: its tokenizer has 49,152 tokens, more than the model's vocab_size "
                                    "1,000 (config.json)")):
        for check in (describe_parent, hf_model_dir):
            with pytest.raises(InputError, match=re.escape(message)):
                check(model)
        assert_refused(script_here(conversion("hf_to_megatron"), model, out), message, out)
    (tmp_path / "text.txt").write_text("Some text.")
    refused = plrd_here("prepare-data", tmp_path / "text.txt", "--tokenizer", without, "--output", tmp_path / "data")
    assert refused.returncode == 2 and f"--tokenizer {without} holds no tokenizer" in refused.stderr
    assert not list(tmp_path.glob("data*"))


def test_a_checkpoint_copied_short_is_refused_naming_the_file_before_any_work(tiny_checkpoint, tmp_path, script_here):
    """A shard file or megatron's common.pt cut short or missing (a copy or transfer that stopped), or the shards'
    index damaged: refused naming the file, as a stage's parent or teacher and by the export (before: torch's reader
    failed midway through the load, naming no file)."""
    ckpt, out = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"), tmp_path / "out"
    shard = next(ckpt.glob("*.distcp"))
    whole = shard.read_bytes()
    for damage, message in ((lambda: shard.write_bytes(whole[:len(whole) // 2]),
                             f"{shard} is cut short ({len(whole) // 2:,} of the "),
                            (shard.unlink, f"{shard} is missing (.metadata places ")):
        damage()
        assert_refused(script_here(conversion("megatron_to_hf"), ckpt, out), message, out)
        with pytest.raises(InputError, match=re.escape(message)):
            describe_parent(ckpt)
    shard.write_bytes(whole)
    common = (ckpt / "common.pt").read_bytes()
    (ckpt / "common.pt").write_bytes(common[:len(common) // 2])
    assert_refused(script_here(conversion("megatron_to_hf"), ckpt, out), f"{ckpt / 'common.pt'} is damaged (BadZipFile",
                   out)
    (ckpt / "common.pt").unlink()
    with pytest.raises(InputError, match=re.escape(f"{ckpt / 'common.pt'} is missing")):
        describe_parent(ckpt)
    (ckpt / "common.pt").write_bytes(common)
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    with pytest.raises(InputError, match=re.escape(f"{ckpt / '.metadata'} is damaged (")):
        describe_parent(ckpt)


def test_damaged_weights_are_refused_naming_the_file_before_any_work(tmp_path):
    """A model.safetensors cut short (a copy or a save that stopped), not safetensors at all, or a shard its
    index names missing: refused as a stage's parent or teacher and by plrd eval, naming the file (before: a
    SafetensorError traceback once the stage had claimed its output, or transformers' own in plrd eval)."""
    tiny = save_tiny_llama(tmp_path / "tiny")
    weights = (tiny / "model.safetensors").read_bytes()
    for damaged, reason in ((weights[:len(weights) // 2], "incomplete metadata"), (b"not safetensors", "header")):
        (tiny / "model.safetensors").write_bytes(damaged)
        for check in (describe_parent, hf_model_dir):
            with pytest.raises(InputError, match=rf"{tiny / 'model.safetensors'} cannot be read as safetensors "
                                                 rf"\(.*{reason}.*\): the model's weights are damaged or were not all "
                                                 "written"):
                check(tiny)
    (tiny / "model.safetensors").write_bytes(weights)
    index = {"weight_map": {"lm_head.weight": "shard-2.safetensors"}}
    (tiny / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=f"{tiny / 'shard-2.safetensors'} cannot be read as safetensors"):
        describe_parent(tiny)
    (tiny / "model.safetensors.index.json").write_text("{")
    with pytest.raises(InputError, match=f"{tiny / 'model.safetensors.index.json'} is not a safetensors index"):
        describe_parent(tiny)
