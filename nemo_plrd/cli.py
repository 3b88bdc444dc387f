"""``plrd``: the command-line entry point."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from nemo_plrd.errors import InputError, OutputExistsError
from nemo_plrd.files import held_folder

if TYPE_CHECKING:
    from nemo_plrd.evaluate import EvalConfig


def positive_int(text: str, high: float = float("inf"), what: str = "a positive integer") -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _port(text: str) -> int:
    return positive_int(text, 65535, "a TCP port (1-65535)")


def run_script(main: Callable[[], None]) -> None:
    """Run a script's ``main``; bad input (``InputError``) ends the process with its message and
    status 2, no traceback. Any other exception is a bug and keeps its traceback."""
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def recipe_config(name: str, description: str, example_config: str, example_overrides: str):
    """A recipe's config (``name``, a class of ``nemo_plrd.config``): ``--config YAML`` plus ``key=value``
    overrides from the command line, validated. The arguments are parsed before torch and megatron load,
    so ``--help`` and a usage error answer at once."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML file, e.g. {example_config}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"YAML-valued overrides, e.g. {example_overrides}")
    args = parser.parse_args()
    from nemo_plrd import config

    return config.load_config(getattr(config, name), args.config, args.overrides)


def _relaunch_under_torchrun(nproc: int) -> int:
    """Re-run this very command as `nproc` torchrun processes (rank 0's output shown)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--local-ranks-filter", "0", "-m", "nemo_plrd.cli", *sys.argv[1:]]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plrd", description="Progressive Low-Rank Decomposition")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="dense vs low-rank SmolLM2-135M architecture under TP")
    demo.add_argument("--tp", type=positive_int, default=3,
                      help="tensor-parallel size; must divide SmolLM2's 3 KV heads (1 or 3)")
    demo.add_argument("--steps", type=positive_int, default=3)
    demo.add_argument("--seq-length", type=positive_int, default=256)
    demo.add_argument("--micro-batch", type=positive_int, default=1)
    evaluate = commands.add_parser("eval", help="lm-eval accuracies and held-out perplexity of an HF model directory")
    evaluate.add_argument("model_dir", help="HF model directory (stock, or a factored PLRD export)")
    evaluate.add_argument("--tasks", default="all",
                          help="comma-separated: arc_easy,arc_challenge,piqa,hellaswag,winogrande,boolq,mmlu (default all)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="items per task (default: all)")
    evaluate.add_argument("--perplexity-blocks", type=int, default=8,
                          help="held-out blocks of 512 tokens per corpus (0: none)")
    evaluate.add_argument("--heldout", default="all",
                          help="comma-separated embedded corpora whose held-out text is scored: "
                               "shakespeare,wikipedia,kjv,news (default all)")
    evaluate.add_argument("--batch-size", type=positive_int, default=8,
                          help="lm-eval requests per forward pass (default 8; larger on a GPU)")
    evaluate.add_argument("--out", default=None, help="results folder (default: plrd-eval/<model dir name>)")
    prepare = commands.add_parser("prepare-data",
                                  help="text / JSON-lines files -> a megatron indexed dataset (.bin/.idx)")
    prepare.add_argument("inputs", nargs="+", help="UTF-8 text files (one document each) or .jsonl / .json files "
                         "(JSON lines: one document per line)")
    prepare.add_argument("--output", required=True, help="the dataset prefix: writes PREFIX.bin and PREFIX.idx")
    prepare.add_argument("--tokenizer", default="smollm2-135m",
                         help="HF model or tokenizer directory (default: the embedded SmolLM2-135M's)")
    prepare.add_argument("--json-key", default="text", help="the text field of each JSON line (default: text)")
    plan = commands.add_parser("plan", help="a family recipe's plan per stage, from the architecture alone")
    plan.add_argument("recipe", help="a family recipe, e.g. recipes/llama2_7b_family.yaml")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style overrides of the recipe")
    submit = commands.add_parser("submit", help="a Bridge family recipe's stages as chained SLURM jobs")
    submit.add_argument("recipe", help="a Bridge family recipe, e.g. recipes/llama2_7b_family.yaml")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style overrides of the recipe")
    submit.add_argument("--nodes", type=positive_int, required=True, help="nodes per stage job")
    submit.add_argument("--gpus-per-node", type=positive_int, required=True)
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--time", help="wall-clock limit per stage job, e.g. 04:00:00")
    submit.add_argument("--container-image", help="pyxis container image holding Megatron-Bridge 0.6 or newer")
    submit.add_argument("--mounts", action="append", default=[], metavar="SRC:DST",
                        help="container mount (repeatable, with --container-image), e.g. /lustre:/lustre")
    submit.add_argument("--workdir", default=os.getcwd(),
                        help="this nemo-plrd checkout as the nodes see it (default: the current directory); "
                             "the jobs run in it, so the recipe's relative paths are read from it")
    submit.add_argument("--port", type=_port, default=29500, help="rendezvous port on each job's first node")
    submit.add_argument("--launcher", choices=("sbatch", "nemo-run"), default="sbatch",
                        help="sbatch scripts chained with --dependency=afterok, or a nemo-run Experiment")
    submit.add_argument("--dry-run", action="store_true", help="print the jobs and their order; submit nothing")
    args, extra = parser.parse_known_args(argv)
    # a refusal shows the command's own usage line ("usage: plrd prepare-data ..."), as argparse's own do
    parser = commands.choices[args.command]
    # overrides may follow the options too (argparse collects a positional list only before them)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e and not e.startswith("~")
                                                        for e in extra)):  # key=value, or ~key (Hydra's delete)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra

    if args.command == "eval":
        return _eval(parser, args)
    if args.command == "prepare-data":
        return _prepare_data(parser, args)
    if args.command == "plan":
        return _plan(parser, args)
    if args.command == "submit":
        return _submit(parser, args)

    if args.command == "demo":
        from nemo_plrd.model import SMOLLM2_135M

        if SMOLLM2_135M.num_query_groups % args.tp:
            parser.error(f"--tp {args.tp} does not divide SmolLM2-135M's "
                         f"{SMOLLM2_135M.num_query_groups} KV heads; use 1 or 3")
        if args.seq_length > SMOLLM2_135M.max_sequence_length:
            parser.error(f"--seq-length {args.seq_length} is longer than SmolLM2-135M's "
                         f"{SMOLLM2_135M.max_sequence_length} positions")
        if "RANK" not in os.environ and args.tp > 1:
            return _relaunch_under_torchrun(args.tp)
        from nemo_plrd.demo import run_demo

        run_demo(args.tp, args.steps, args.seq_length, args.micro_batch)
    return 0


def _eval(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nemo_plrd.assets import CORPORA
    from nemo_plrd.evaluate import TASKS, EvalConfig, evaluate, hf_model_dir, markdown, write_results

    def names(value: str, every) -> list[str]:
        return list(every) if value == "all" else [name.strip() for name in value.split(",") if name.strip()]

    model_dir = Path(args.model_dir).resolve()  # results.json names it whatever directory a rerun starts in
    out = Path(args.out or Path("plrd-eval") / model_dir.name)
    try:
        cfg = EvalConfig(names(args.tasks, TASKS), args.limit, args.perplexity_blocks, names(args.heldout, CORPORA),
                         args.batch_size)
        if not cfg.tasks and not cfg.perplexity_blocks:
            raise InputError(f"--tasks {args.tasks!r} names no task and --perplexity-blocks is 0: nothing to evaluate")
        hf_model_dir(model_dir)  # refused before --out is made
        done = (out / "results.json").is_file()  # then only read: a read-only --out reports its results too
        if not done:
            with held_folder(out, EVAL_LOCK, f"--out {out}", "is being written by another plrd eval",
                             "let it finish, or choose another --out"):
                done = (out / "results.json").is_file()  # written by another plrd eval since
                if not done:
                    result = evaluate(model_dir, **vars(cfg)) | {"model_files": _model_files(model_dir),
                                                                 "model_from_out": _from_out(model_dir, out)}
                    write_results(result, out)
        if done:
            result = _earlier_results(out, model_dir, cfg)
    except InputError as error:  # named as the recipes' eval section has them (eval.limit): here, the flags
        keys = "|".join(field.name for field in dataclasses.fields(EvalConfig))  # a key, not inside a path
        flag = lambda key: "--" + key[1].replace("_", "-")
        parser.error(re.sub(rf"(?<![\w./-])eval\.({keys})\b", flag, str(error)))
    print(markdown(result))
    print(f"{'already evaluated' if done else 'results'}: {out / 'results.json'}, {out / 'results.md'}")
    return 0


EVAL_LOCK = ".lock"  # in --out while a plrd eval writes it


def _earlier_results(out: Path, model_dir: Path, cfg: EvalConfig) -> dict:
    """The results in ``out``, if they answer this very request (a rerun reports them); another model's or
    other settings' are refused, naming what differs (every PLRD export is named hf-<format>: a default
    ``--out`` is shared by every member)."""
    asked = {"model": _from_out(model_dir, out), "model_files": _model_files(model_dir), "tasks": sorted(cfg.tasks),
             "limit": cfg.limit, "perplexity_blocks": cfg.perplexity_blocks,
             "heldout": sorted(cfg.heldout) if cfg.perplexity_blocks else []}
    try:
        earlier = json.loads((out / "results.json").read_text())
        held = {"model": earlier.get("model_from_out", _from_out(earlier["model"], out)),
                "model_files": earlier.get("model_files", "not recorded"), "tasks": sorted(earlier["tasks"]),
                "limit": earlier["limit"],
                "perplexity_blocks": earlier.get("perplexity_blocks"), "heldout": sorted(earlier["perplexity"])}
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not plrd eval's record
        raise OutputExistsError(f"--out {out} holds a results.json that plrd eval did not write; choose another "
                                "--out") from None
    shown = held | {"model": earlier["model"]}
    differ = [f"{key} {shown[key]!r}" for key in asked if asked[key] != held[key]]
    if differ:
        raise OutputExistsError(f"--out {out} already holds the results of another evaluation "
                                f"({', '.join(differ)}); choose another --out")
    return earlier


def _from_out(model_dir: str | Path, out: Path) -> str:
    """The model's path from ``--out``: a stage's folder renamed once complete (``stage.partial`` -> ``stage``, its
    export and evaluation inside) holds the same evaluation of the same model."""
    return os.path.relpath(model_dir, out.resolve())


def _model_files(model_dir: Path) -> str:
    """The model directory's files by name, size and modification time, without reading its weights: a model
    removed and written again at the same path is another model (what plrd eval writes there, with --out the
    model's folder, is not the model)."""
    from nemo_plrd.evaluate import RESULT_FILES

    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file() and p.name not in (*RESULT_FILES, EVAL_LOCK)):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _prepare_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from itertools import chain

    from nemo_plrd.assets import smollm2_135m
    from nemo_plrd.config import EMBEDDED_PARENT
    from nemo_plrd.data import dataset_written, megatron_tokenizer, prepare_dataset, read_documents
    from nemo_plrd.files import refuse_existing
    from nemo_plrd.hf import hf_tokenizer

    try:
        if args.output.endswith("/") or Path(args.output).is_dir():
            raise InputError(f"--output {args.output} is a folder; give the dataset's path prefix (--output "
                             f"{Path(args.output) / 'corpus'} writes {Path(args.output) / 'corpus'}.bin and .idx)")
        if Path(args.output).suffix in (".bin", ".idx"):  # the prefix gets them: corpus.bin would write corpus.bin.bin
            prefix = Path(args.output).with_suffix("")
            raise InputError(f"--output {args.output} names one of the dataset's files; give its path prefix "
                             f"(--output {prefix} writes {prefix}.bin and .idx)")
        refuse_existing(args.output, "dataset", exists=dataset_written)
        tokenizer_dir = smollm2_135m() if args.tokenizer == EMBEDDED_PARENT else Path(args.tokenizer)
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            raise InputError(f"--tokenizer {tokenizer_dir} is not an HF model or tokenizer directory "
                             "(no tokenizer_config.json)")
        try:
            hf_tokenizer(tokenizer_dir)
        except InputError as error:
            raise type(error)(f"--tokenizer {error}") from None
        documents = chain.from_iterable([read_documents(path, args.json_key) for path in args.inputs])  # all there
        prefix = prepare_dataset(documents, megatron_tokenizer(tokenizer_dir), args.output, progress=True)
    except InputError as error:
        parser.error(str(error))
    print(f"wrote {prefix}.bin, {prefix}.idx: use it as 'dataset.blend=[[{prefix}], null]' in a stage "
          "(stage.dataset.blend in a family, blend in a Bridge family)")
    return 0


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nemo_plrd.family_plan import family_table, load_family, recipe_plan

    try:
        arch, parent, stages = recipe_plan(load_family(args.recipe, args.overrides))
    except InputError as error:
        parser.error(str(error))
    print(family_table(arch, stages, parent))
    return 0


def _submit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from nemo_plrd.bridge.family import BridgeFamilyConfig
    from nemo_plrd.family_plan import load_family
    from nemo_plrd.slurm import STAGE_JOB, Cluster, submit

    recipe = os.path.abspath(args.recipe)
    try:
        cluster = Cluster(args.nodes, args.gpus_per_node, args.partition, args.account, args.time,
                          args.container_image, tuple(args.mounts), args.workdir, args.port)
        if not os.path.isdir(cluster.workdir) and (os.path.exists(cluster.workdir) or not args.dry_run):
            raise InputError(f"--workdir {cluster.workdir} is not a folder on this machine; submit from a node that "
                             "sees the checkout the jobs run in, or --dry-run")
        if os.path.isdir(cluster.workdir) and not os.path.isfile(os.path.join(cluster.workdir, STAGE_JOB)):
            raise InputError(f"--workdir {cluster.workdir} is not a nemo-plrd checkout (no {STAGE_JOB}): the jobs run "
                             "its recipes and conversion scripts, and the recipe's relative paths are read from it")
        # the recipe's relative paths (output, parent, blend, job.config_file) as the jobs read them
        with contextlib.chdir(cluster.workdir) if os.path.isdir(cluster.workdir) else contextlib.nullcontext():
            family = load_family(recipe, args.overrides)
            if not isinstance(family, BridgeFamilyConfig):
                raise InputError(f"{args.recipe} is a local family (keep:, stage:); run it with recipes/family.py, "
                                 "or give a Bridge family recipe (target_params:, job:)")
            if args.launcher == "nemo-run":
                from nemo_plrd.experiment import submit_experiment

                submit_experiment(family, cluster, args.dry_run)
            else:
                submit(family, cluster, args.dry_run)
    except InputError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
