"""plrd eval on the real SmolLM2-135M: real numbers, from the model, stable, bad input refused."""

import json
import math
import shutil
import statistics
import subprocess
import sys

import pytest
import torch
import transformers
from filelock import FileLock
from tiny_llama import save_tiny_llama

from nemo_plrd import evaluate as evaluate_module
from nemo_plrd.assets import smollm2_135m
from nemo_plrd.evaluate import evaluate, heldout_blocks, markdown, with_stderr, write_results


def plrd_eval(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_plrd.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as lm-eval's HF model does (no special tokens)."""
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, len(context_ids):]
    return logprobs[len(context_ids) - 1:].gather(-1, targets[:, None]).sum().item()


def test_scores_come_from_the_model():
    parent = smollm2_135m()
    result = evaluate(parent, tasks=("arc_easy",), limit=3, perplexity_blocks=0, samples=True)
    assert result["perplexity"] == {} and "perplexity" not in markdown(result)  # 0 blocks: none measured
    model = transformers.AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(parent)
    correct = []
    for sample in result["samples"]["arc_easy"]:
        ours = [loglikelihood(model, tokenizer, *pair) for pair in sample["arguments"]]
        theirs = [loglik for loglik, _ in sample["filtered_resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        correct.append(max(range(len(ours)), key=ours.__getitem__) == sample["target"])
    assert result["tasks"]["arc_easy"]["acc"] == pytest.approx(sum(correct) / len(correct))


def test_a_task_scored_on_one_item_is_reported_without_a_standard_error(tmp_path):
    """lm-eval has no standard error of one item (it reports "N/A"): the accuracy is written alone."""
    result = evaluate(smollm2_135m(), tasks=("piqa",), limit=1, perplexity_blocks=0)
    assert result["items"]["piqa"] == 1 and result["tasks"]["piqa"]["acc_stderr"] == "N/A"
    write_results(result, tmp_path)
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.lstrip().startswith("piqa"))
    assert row.split() == ["piqa", "1", f"{result['tasks']['piqa']['acc']:.3f}", f"{result['tasks']['piqa']['acc_norm']:.3f}"]


def test_held_out_perplexity_alone_reads_no_lm_eval_set(monkeypatch):
    """eval.tasks=[]: a Bridge family's members still get their held-out perplexity, and nothing is fetched
    for lm-eval (a compute node has no network)."""
    monkeypatch.setattr(evaluate_module, "eval_sets", lambda: pytest.fail("an lm-eval set was read"))
    result = evaluate(smollm2_135m(), tasks=(), perplexity_blocks=1, heldout=["kjv"])
    assert result["tasks"] == result["items"] == {}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_135m(), dtype=torch.float32)
    block = heldout_blocks(transformers.AutoTokenizer.from_pretrained(smollm2_135m()), 1, "kjv")
    with torch.no_grad():  # the next-token cross entropy of the one block, from the logits, in float64
        loss = torch.nn.functional.cross_entropy(model(block).logits[0, :-1].double(), block[0, 1:])
    # (HF's loss sums 512 tokens' log-softmax over 49,152 logits in float32: measured 1.7e-5 apart)
    assert result["perplexity"]["kjv"] == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert markdown(result).count("held-out perplexity") == 1


def test_cli_writes_stable_results_for_every_task(tmp_path, plrd_here):
    runs = []  # in a new interpreter and in this one: results that differ from one to the next would show
    for name, plrd in (("a", plrd_eval), ("b", lambda *args: plrd_here("eval", *args))):
        done = plrd(smollm2_135m(), "--limit", "2", "--perplexity-blocks", "1", "--heldout", "shakespeare,news",
                    "--out", tmp_path / name)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "held-out perplexity" in done.stdout
        runs.append(json.loads((tmp_path / name / "results.json").read_text()))
    first, second = runs
    assert set(first["tasks"]) == {"arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "mmlu"}
    assert all(0 <= value <= 1 for task in first["tasks"].values() for value in task.values())
    assert first["items"] == {task: 2 for task in first["tasks"]}
    for scores in first["tasks"].values():  # lm-eval's standard error of a mean of n 0/1 scores
        assert scores["acc_stderr"] == pytest.approx(math.sqrt(scores["acc"] * (1 - scores["acc"]) / (2 - 1)))
    assert set(first["perplexity"]) == {"shakespeare", "news"}
    assert all(5 < value < 500 for value in first["perplexity"].values())  # SmolLM2 on either: tens
    assert first["tasks"] == second["tasks"] and first["perplexity"] == pytest.approx(second["perplexity"], rel=1e-6)
    table = (tmp_path / "a" / "results.md").read_text()
    assert table.count("\n") == 10 and "held-out perplexity: news" in table  # header + 7 tasks + 2 corpora
    assert " ± " in table
    results = (tmp_path / "a" / "results.json").read_bytes()
    again = plrd_here("eval", smollm2_135m(), "--limit", "2", "--perplexity-blocks", "1", "--heldout",
                      "shakespeare,news", "--out", tmp_path / "a")  # the same request: reported, not run again
    assert again.returncode == 0 and again.stdout.startswith(table) and "already evaluated" in again.stdout
    other = plrd_here("eval", smollm2_135m(), "--limit", "2", "--out", tmp_path / "a")  # other settings (or model)
    assert other.returncode == 2 and (f"--out {tmp_path / 'a'} already holds the results of another evaluation "
                                      "(perplexity_blocks 1, heldout ['news', 'shakespeare'])") in other.stderr
    model = tmp_path / "model"  # the same path holding another model (removed and written again): evaluated
    shutil.copytree(smollm2_135m(), model)
    plrd_here("eval", model, "--tasks", "piqa", "--limit", "1", "--perplexity-blocks", "0", "--out", tmp_path / "m")
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    again = plrd_here("eval", model, "--tasks", "piqa", "--limit", "1", "--perplexity-blocks", "0",
                      "--out", tmp_path / "m")
    assert again.returncode == 2 and "another evaluation (model_files" in again.stderr
    assert (tmp_path / "a" / "results.json").read_bytes() == results
    for run in ("evaluated", "reported"):  # results beside the model's files are not the model
        beside = plrd_here("eval", model, "--tasks", "piqa", "--limit", "1", "--perplexity-blocks", "0", "--out", model)
        assert beside.returncode == 0 and ("already evaluated" in beside.stdout) == (run == "reported"), beside.stderr


def test_an_evaluation_moved_with_its_model_is_reported_not_refused(tmp_path, plrd_here):
    """A SLURM stage evaluates its export inside stage.partial/, then renames the folder: asked again in the
    renamed folder, the same evaluation of the same model is reported."""
    partial = tmp_path / "stage.partial"
    save_tiny_llama(partial / "hf-merged")
    first = plrd_here("eval", partial / "hf-merged", "--tasks", "piqa", "--limit", "1", "--perplexity-blocks", "0",
                      "--out", partial / "eval")
    assert first.returncode == 0, first.stderr[-3000:]
    partial.rename(tmp_path / "stage")
    again = plrd_here("eval", tmp_path / "stage" / "hf-merged", "--tasks", "piqa", "--limit", "1",
                      "--perplexity-blocks", "0", "--out", tmp_path / "stage" / "eval")
    assert again.returncode == 0 and "already evaluated" in again.stdout, again.stderr[-3000:]
    shutil.copytree(tmp_path / "stage" / "hf-merged", tmp_path / "elsewhere", copy_function=shutil.copy2)
    other = plrd_here("eval", tmp_path / "elsewhere", "--tasks", "piqa", "--limit", "1", "--perplexity-blocks", "0",
                      "--out", tmp_path / "stage" / "eval")  # the same files at another path: another model
    assert other.returncode == 2 and f"another evaluation (model '{partial / 'hf-merged'}')" in other.stderr


def test_bad_input_is_refused(tmp_path, plrd_here, monkeypatch):
    with monkeypatch.context() as here:
        here.chdir(tmp_path)
        missing = plrd_here("eval", tmp_path / "eval.limit")  # the default --out, plrd-eval/eval.limit: not made
    assert missing.returncode == 2 and f"{tmp_path / 'eval.limit'} is not a Hugging Face model directory (no " \
        "config.json)" in missing.stderr  # a path, not a key to rename to a flag
    assert not (tmp_path / "plrd-eval").exists()
    (tmp_path / "done").mkdir()  # results there already: the model is looked for all the same
    (tmp_path / "done" / "results.json").write_text("{}")
    missing = plrd_here("eval", tmp_path / "nowhere", "--out", tmp_path / "done")
    assert missing.returncode == 2 and "is not a Hugging Face model directory (no config.json)" in missing.stderr
    unknown = plrd_here("eval", smollm2_135m(), "--tasks", "arc_easy,squad", "--out", tmp_path / "out")
    assert unknown.returncode == 2 and "unknown task(s) ['squad']; the tasks are" in unknown.stderr
    corpus = plrd_here("eval", smollm2_135m(), "--heldout", "shakespeare,poetry", "--out", tmp_path / "out")
    assert corpus.returncode == 2 and "--heldout=['shakespeare', 'poetry'] must name distinct embedded corpora, " \
        "one or more, of ['shakespeare', 'wikipedia', 'kjv', 'news']" in corpus.stderr
    blocks = plrd_here("eval", smollm2_135m(), "--perplexity-blocks", "-1", "--out", tmp_path / "out")
    assert blocks.returncode == 2 and "--perplexity-blocks=-1 must be >= 0" in blocks.stderr  # the flag
    many = plrd_here("eval", smollm2_135m(), "--tasks", ",", "--perplexity-blocks", "100000", "--heldout", "kjv",
                     "--out", tmp_path / "out")  # refused once the text is cut into blocks: the flag too
    assert many.returncode == 2 and "--perplexity-blocks=100000: the held-out kjv text holds" in many.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("")  # refused before the evaluation, not when its results are written
    file = plrd_here("eval", smollm2_135m(), "--tasks", "piqa", "--out", tmp_path / "file")
    assert file.returncode == 2 and f"--out {tmp_path / 'file'} cannot be made a folder: File exists" in file.stderr
    (tmp_path / "busy").mkdir()
    with FileLock(tmp_path / "busy" / ".lock"):  # another plrd eval writing there: each would replace the other's
        busy = plrd_here("eval", smollm2_135m(), "--tasks", "piqa", "--out", tmp_path / "busy")
    assert busy.returncode == 2 and f"--out {tmp_path / 'busy'} is being written by another plrd eval" in busy.stderr
    for text in ("{}", "not json"):  # results.json of something else: refused, not a traceback
        (tmp_path / "done" / "results.json").write_text(text)
        foreign = plrd_here("eval", smollm2_135m(), "--tasks", "piqa", "--out", tmp_path / "done")
        assert foreign.returncode == 2 and f"--out {tmp_path / 'done'} holds a results.json that plrd eval did not " \
            "write; choose another --out" in foreign.stderr
    nothing = plrd_here("eval", smollm2_135m(), "--tasks", ",", "--perplexity-blocks", "0", "--out", tmp_path / "out")
    assert nothing.returncode == 2 and "--tasks ',' names no task and --perplexity-blocks is 0: nothing to " \
        "evaluate" in nothing.stderr
    assert not (tmp_path / "out").exists()


def test_a_limit_on_mmlu_scores_items_of_every_subject():
    """MMLU's 57 subjects are one split of files in alphabetical order; with a limit of 57 the items
    scored are one per subject (before: the first 57 of abstract algebra)."""
    result = evaluate(smollm2_135m(), tasks=("mmlu",), limit=57, perplexity_blocks=1, heldout=("news",), samples=True)
    subjects = [sample["doc"]["subject"] for sample in result["samples"]["mmlu"]]
    assert len(subjects) == 57 and len(set(subjects)) == 57
    # the report's "acc ± stderr": the standard error of the mean over the items scored
    correct = [sample["acc"] for sample in result["samples"]["mmlu"]]
    scores = result["tasks"]["mmlu"]
    assert scores["acc"] == pytest.approx(statistics.mean(correct)) and 0 < scores["acc"] < 1
    assert scores["acc_stderr"] == pytest.approx(statistics.stdev(correct) / math.sqrt(len(correct)))
    assert with_stderr(scores) == f"{scores['acc']:.3f} ± {scores['acc_stderr']:.3f}"
