"""Setting up an evaluation's lm-eval tasks: lm-eval's default task manager vs the one ``evaluate`` passes.

    .venv/bin/python bench/eval_setup.py [--repeats 3]

``simple_evaluate`` without a task manager builds one that indexes every task YAML lm-eval ships
(~14,000 files) before it loads the configs it is handed; ``nemo_plrd.evaluate`` hands it whole configs
(``task_configs``: lm-eval's YAMLs with their includes resolved, the data source local) and a manager
without that index. Both load the seven tasks of a family's evaluation, interleaved; the tasks they
build are checked to be the same (names, item counts, every item's prompt) before any time is reported.
Every family member and every ``plrd eval`` pays this once.
"""

from __future__ import annotations

import argparse

from lm_eval.tasks import TaskManager
from timing import interleaved_medians, speedup_table  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int
from nemo_plrd.evaluate import TASKS, offline_environment, task_configs


def load(include_defaults: bool) -> dict:
    return TaskManager(include_defaults=include_defaults).load(task_configs(TASKS))["tasks"]


def prompts(tasks: dict) -> dict[str, list[str]]:
    return {name: [str(task.doc_to_text(doc)) for doc in task.eval_docs] for name, task in tasks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    offline_environment()
    assert prompts(load(True)) == prompts(load(False)), "the two managers built different tasks"
    seconds = interleaved_medians({"default": lambda: load(True), "configs": lambda: load(False)}, args.repeats)
    print(f"loading {len(TASKS)} tasks ({', '.join(TASKS)}), median of {args.repeats} interleaved rounds")
    print(speedup_table("task manager", ("lm-eval's default (indexes every task YAML)", seconds["default"]),
                        ("evaluate's (the configs alone)", seconds["configs"])))


if __name__ == "__main__":
    main()
