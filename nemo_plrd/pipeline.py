"""A PLRD stage and a PLRD family as resumable pipelines.

A stage: load the parent -> calibrate -> decompose (or re-truncate) -> train at the new rank ->
checkpoint -> HF export -> evaluate -> summary. A family: stage after stage, each stage's parent
the previous stage's checkpoint, then lm-eval of every member and a report.

Everything is written under ``OUTPUT.partial`` and renamed to ``OUTPUT`` when complete, and each
step leaves a record the next run reads, so the same command, run again after an interruption
at any point, redoes only what was not saved:

- a finished stage or family (``OUTPUT`` exists) is not run again (only the optimizer's state,
  removed right after the rename, goes if a stop came between the two);
- the decomposed model is saved before training (``train/iter_0000000``), and training saves
  model, optimizer, scheduler, RNG and data position every ``train.save_interval`` steps; a
  rerun resumes from the last save and takes exactly the steps the uninterrupted run would;
- a final checkpoint or export already renamed into place is kept.

The config a run started with is kept beside its outputs (``config.json``); a rerun with a
different config is refused, naming what differs, and so is a second run of an output that
another run is still writing (``sole_run``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from filelock import FileLock
from megatron.core import dist_checkpointing, parallel_state
from tqdm import tqdm

from nemo_plrd import distill, report
from nemo_plrd.assets import CORPORA, corpus_dataset, smollm2_135m
from nemo_plrd.checkpoint import (build_model, describe_parent, load_model, load_parent, read_metadata,
                                  save_checkpoint)
from nemo_plrd.config import (BASELINES, EMBEDDED_PARENT, TEACHERS, DecomposeConfig, FamilyConfig, config_differences,
                              field_defaults, keys_under, stream_length)
from nemo_plrd.data import DataParallelBatches, calibration_batches, gpt_datasets, megatron_tokenizer
from nemo_plrd.errors import InputError
from nemo_plrd.evaluate import HELDOUT_BLOCK, EvalConfig, evaluate, heldout_blocks, write_results
from nemo_plrd.export import check_export_dtype, export_hf
from nemo_plrd.family_plan import parent_plan, plan_family
from nemo_plrd.files import leftover_temp_files, try_acquire, write_text_atomic
from nemo_plrd.hf import hf_tokenizer
from nemo_plrd.model import LlamaArch, check_sequence_length, check_tensor_parallel, parameter_count
from nemo_plrd.parallel import exists_on_rank0, init_model_parallel, rank0_decides
from nemo_plrd.train import Schedule, Trainer, keep_saved_steps, perplexity, run, shard
from nemo_plrd.transform import apply_plan, model_ranks, plan_for

CONFIG = "config.json"
METRICS = "metrics.jsonl"  # a stage's training rows, one per logged step
# what a stage writes before its decomposition is saved (plan, the checkpoint being written, and in a folder retrained
# before, the rows of unsaved steps); in a family's folder, its stages' and baselines' .partial folders
LEFT_BEFORE_DECOMPOSED = ("plan.json", "plan.txt", "train", METRICS)
ITERATION = "iter_{:07d}"
DECOMPOSED = ITERATION.format(0)  # the decomposed model, before any training step


def init_parallel(cfg: DecomposeConfig) -> None:
    """megatron's parallel state for this world: TP from the config, DP the rest; the layout checked."""
    init_model_parallel(cfg.parallel.tensor_model_parallel_size, key="parallel.tensor_model_parallel_size")
    cfg.train.check_layout(parallel_state.get_data_parallel_world_size())


def _rank0() -> bool:
    return dist.get_rank() == 0


def _keeps_work(folder: Path) -> bool:
    """Whether a stage's folder (or a family's, through its stages and baselines) holds a saved decomposition."""
    return (folder / "decomposed.json").is_file() or any(
        _keeps_work(sub) for sub in folder.iterdir() if sub.is_dir() and sub.name != "train")


# a stage's settings read only from its first training step on: until a training checkpoint exists, a rerun may
# change them (a training setting refused after the decomposition is fixed without decomposing again)
TRAINING_KEYS = ("train.", "optimizer.", "ddp.", "mixed_precision", "export", "export_dtype")


def _untrained(folder: Path) -> bool:
    """Whether a stage's unfinished folder holds nothing after its decomposition: no training step saved, and no
    checkpoint, export or evaluation, which a rerun keeps as they are (a run with train.steps=0 writes them)."""
    latest = _latest(folder / "train")
    return (latest is None or latest.name == DECOMPOSED) and not (folder / "checkpoint").exists() and not any(
        folder.glob("hf-*")) and not (folder / "eval").exists()


def _family_untrained(folder: Path) -> bool:
    """Whether no stage or baseline of a family's unfinished folder has trained (a finished one has)."""
    return all(sub.name.endswith(".partial") and _untrained(sub) for sub in folder.iterdir()
               if sub.is_dir() and sub.name != "eval")


def claim(folder: Path, cfg: Any, finished: bool = False, untrained: Callable[[], bool] = lambda: False,
          section: str = "") -> None:
    """Record ``cfg`` in ``folder`` (created if missing), or check it against the one recorded there.

    A different config is refused, naming every key whose value differs, unless the unfinished
    ``folder`` keeps no work (a run refused for bad input after its claim, or stopped before its first
    decomposition was saved: the rerun with other settings takes the folder over, and what that run wrote
    goes), or only ``TRAINING_KEYS`` (under ``section``: a family's ``stage.``) differ and it is
    ``untrained()``; a ``finished`` output that holds no record (not written by this pipeline) is refused
    too. Every rank gets rank 0's verdict.
    """
    config = dataclasses.asdict(cfg)
    verdict: list = [None]
    if _rank0():
        record = folder / CONFIG
        changed = record.is_file() and config_differences(json.loads(record.read_text()), config,
                                                          field_defaults(type(cfg)))
        retrain = bool(changed) and not finished and all(line.startswith(section) and line.split(":")[0].removeprefix(
            section).startswith(TRAINING_KEYS) for line in changed) and untrained()
        if finished and not record.is_file():
            verdict[0] = ["foreign", []]
        elif record.is_file() and not retrain and (finished or not changed or _keeps_work(folder)):
            verdict[0] = ["existing", changed]
        else:
            if retrain:
                print(f"{folder}: not trained yet, so it trains with the changed settings: {'; '.join(changed)}")
                (folder / METRICS).unlink(missing_ok=True)  # rows of steps no checkpoint holds
            elif record.is_file():  # taken over: what the refused or stopped run left is no work to keep
                for entry in folder.iterdir():
                    if entry.name in LEFT_BEFORE_DECOMPOSED or entry.name.endswith(".partial"):
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, json.dumps(config, indent=1) + "\n")
            verdict[0] = ["new", []]
    dist.broadcast_object_list(verdict, src=0)
    state, changed = verdict[0]
    if state == "foreign":
        raise InputError(f"output={str(folder)!r} already exists and was not written by this recipe; "
                         "choose a new output")
    if changed:
        raise InputError(f"{folder} was started with another config; rerun with the same settings to resume it, "
                         f"or choose a new output. Differences (then -> now): {'; '.join(changed)}")


def partial_folder(output: str) -> Path:
    """Where ``output`` is written until it is complete, then renamed."""
    return Path(output + ".partial")


RECORDS = ("decomposed.json", "summary.json", "summary.md", "results.json", "family.json")  # what name paths


def _moved(value: Any, old: str, new: str) -> Any:
    """``value`` (a record's JSON) with every path under ``old`` under ``new``."""
    if isinstance(value, str):
        return new + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [_moved(item, old, new) for item in value]
    if isinstance(value, dict):
        return {key: _moved(item, old, new) for key, item in value.items()}
    return value


def finish(partial: Path, out: Path) -> None:
    """Rename ``partial`` to ``out``, its records first made to name the paths under it as they will be.

    The records were written during the run (a family's member is evaluated in ``OUTPUT.partial``,
    a later stage starts from the previous one's checkpoint there), and a finished output should not
    send its reader to a folder that no longer exists. ``config.json`` keeps what the run was given.
    """
    old, new = str(partial), str(out)
    for name in RECORDS:
        for record in partial.rglob(name):
            text = record.read_text()
            write_text_atomic(record, text.replace(old + "/", new + "/") if record.suffix == ".md" else
                              json.dumps(_moved(json.loads(text), old, new), indent=1) + "\n")
    for tmp in leftover_temp_files(partial):  # a killed run's, not part of the output
        tmp.unlink()
    partial.rename(out)


@contextmanager
def sole_run(output: str) -> Iterator[None]:
    """The one run writing ``output``: a second one (a double launch, a job requeued while the first
    still runs) is refused, instead of deleting the first one's checkpoints under it.

    Rank 0 holds a lock in ``OUTPUT.partial`` while the run lasts (the kernel drops it when the
    process dies, so a killed run leaves nothing to clear); a finished output is only read.
    """
    partial = partial_folder(output)
    lock = FileLock(partial / ".lock") if _rank0() and not Path(output).exists() else None

    def refusal() -> Optional[str]:
        if lock is None:
            return None
        try:
            partial.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a folder the configs' checks let through: a read-only mount, /proc
            return f"output={output!r} cannot be made: {error.strerror} ({partial})"
        if not try_acquire(lock):
            return (f"output={output!r} is being written by another run (it holds {partial / '.lock'}); "
                    "let it finish, or stop it, then run this again")
        return None

    refused = rank0_decides(refusal)  # on every rank: rank 0's error alone would leave the others waiting
    if refused:
        raise InputError(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            (Path(output) / ".lock").unlink(missing_ok=True)  # renamed with the finished output
            if partial.is_dir() and [p.name for p in partial.iterdir()] == [".lock"]:  # refused before any work
                shutil.rmtree(partial)


def _latest(train_dir: Path) -> Optional[Path]:
    """The last complete training checkpoint (iteration 0: the decomposed model, before any step)."""
    done = sorted(p for p in train_dir.glob("iter_*") if not p.name.endswith(".partial"))
    return done[-1] if done else None


def _folder(source: str) -> Path:
    """A parent's folder: the embedded one's cache, or the directory given."""
    return smollm2_135m() if source == EMBEDDED_PARENT else Path(source)


def _blend(cfg: DecomposeConfig, hf_source: Path) -> tuple[list[str], Optional[list[float]]]:
    prefixes, weights = cfg.dataset.blend
    return [corpus_dataset(p, hf_source) if p in CORPORA else p for p in prefixes], weights


def _datasets(cfg: DecomposeConfig, hf_source: Path, seq_length: int, samples: int, valid_samples: int = 0):
    """The train and valid splits of the stage's data: ``samples`` and ``valid_samples`` sequences
    of ``seq_length`` tokens (megatron repeats epochs when a split holds fewer); valid None if 0."""
    train, valid, _ = gpt_datasets(_blend(cfg, hf_source), cfg.dataset.split, seq_length,
                                   [samples, valid_samples or None, None], _megatron_tokenizer(hf_source),
                                   cfg.dataset.random_seed)
    return train, valid


@functools.lru_cache(maxsize=4)
def _megatron_tokenizer(hf_source: Path):
    """Loaded once per run for the four times the stage builds its datasets (a third of a second a load); cached
    here, not on ``megatron_tokenizer``, whose source names the corpus datasets' cache folders."""
    return megatron_tokenizer(hf_source)


def _calibration_dataset(cfg: DecomposeConfig, hf_source: Path):
    """The first ``calibration.tokens`` of the train split, at calibration's own sequence length."""
    calib = cfg.plrd.calibration
    return _datasets(cfg, hf_source, calib.seq_length, calib.tokens // calib.seq_length)[0]


def _training_datasets(cfg: DecomposeConfig, hf_source: Path):
    """The train split as the stage's stream (its family's whole, so every stage sees one order) and the valid split."""
    return _datasets(cfg, hf_source, cfg.train.seq_length,
                     stream_length(cfg.train.first_sample, cfg.train.stream_samples, cfg.train.samples),
                     cfg.train.eval_iters * cfg.train.global_batch)


@functools.lru_cache(maxsize=4)
def _heldout(hf_source: Path, num_blocks: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """{corpus: the held-out blocks every report scores}, tokenised once per run by one tokenizer."""
    tokenizer = hf_tokenizer(hf_source)  # loaded by describe_parent
    return {name: heldout_blocks(tokenizer, num_blocks, name) for name in names}


def check_inputs(cfg: DecomposeConfig) -> Path:
    """Before the output is claimed, what would otherwise be refused only once the stage runs: a claimed folder
    that holds a decomposition resumes only with the settings it started with, so the fixed rerun would be
    refused too. The TP size against the parent's shapes, the teacher, ``eval.perplexity_blocks`` against the
    held-out texts as the parent's tokenizer cuts them, and the data's splits against the samples asked of them
    (megatron keeps the indices it builds here in its cache, for the stage). Returns the folder of the parent's
    HF config and tokenizer, as found now (a resumed run may see the asset cache elsewhere). The plan is checked
    uniformly, on the parent's shapes: its budget against the parent's size and the smallest plan."""
    arch, ranks, hf_source = describe_parent(_folder(cfg.parent))
    plan_family(arch, [cfg.plrd.plan.request()], parent_plan(arch, ranks), name=lambda _: "plrd.plan")
    check_tensor_parallel(arch, cfg.parallel.tensor_model_parallel_size, "parallel.tensor_model_parallel_size")
    check_sequence_length(arch, cfg.plrd.calibration.seq_length, "plrd.calibration.seq_length")
    if cfg.train.steps:
        check_sequence_length(arch, cfg.train.seq_length, "train.seq_length")
    if cfg.train.steps and cfg.train.loss != "lm":
        check_teacher_source(cfg)
    if cfg.export:
        check_export_dtype(cfg.export_dtype, hf_source, "export_dtype")
    if cfg.eval.perplexity_blocks:
        _heldout(hf_source, cfg.eval.perplexity_blocks, tuple(cfg.eval.heldout))
    _calibration_dataset(cfg, hf_source)
    if cfg.train.steps:
        _training_datasets(cfg, hf_source)
    return hf_source


def heldout_perplexity(model: torch.nn.Module, cfg: DecomposeConfig, hf_source: Path) -> Optional[dict[str, float]]:
    """{corpus: the megatron model's held-out perplexity} (None with eval.perplexity_blocks=0); half a
    minute or more on a CPU, so rank 0 shows its share in tokens/s. The data-parallel ranks split the blocks."""
    if not cfg.eval.perplexity_blocks:
        return None
    blocks = _heldout(hf_source, cfg.eval.perplexity_blocks, tuple(cfg.eval.heldout))
    group = parallel_state.get_data_parallel_group()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    with tqdm(total=sum(shard(b, rank, size)[:, 1:].numel() for b in blocks.values()), desc="held-out perplexity",
              unit="tok", unit_scale=True, disable=not _rank0()) as bar:
        return {name: perplexity(model, b, progress=bar, group=group) for name, b in blocks.items()}


def decompose(cfg: DecomposeConfig, partial: Path, parent_perplexity: Optional[dict] = None
              ) -> tuple[torch.nn.Module, dict]:
    """The parent, calibrated and decomposed to the stage's plan; the figures measured on the way
    (the parent's held-out perplexity only where the caller does not know it already)."""
    rank0 = _rank0()
    model, arch, hf_source = load_parent(_folder(cfg.parent))
    calib = cfg.plrd.calibration
    samples = calib.tokens // calib.seq_length

    def calibrate() -> list[torch.Tensor]:
        return calibration_batches(_calibration_dataset(cfg, hf_source), samples, calib.micro_batch)

    request = cfg.plrd.plan.request()
    # a keep or target_params plan by spectrum needs the spectra; explicit ranks (the control's) do not
    calibration = calibrate() if cfg.plrd.plan.allocation == "spectrum" and "ranks" not in request else None
    plan = plan_for(model, calibration or (), cfg.plrd.method, ridge=cfg.plrd.ridge, **request)
    changes = plan.layer_ranks() != model_ranks(model)  # plrd.plan.ranks={} keeps every slot: the control
    if rank0:
        print(plan.table(), flush=True)
    figures = {"parent": cfg.parent, "parent_params": parameter_count(model),
               "parent_perplexity": parent_perplexity or heldout_perplexity(model, cfg, hf_source)}
    if changes:
        apply_plan(model, plan, calibration or calibrate(), cfg.plrd.method, progress=rank0, solver=cfg.plrd.solver,
                   ridge=cfg.plrd.ridge)
    figures |= {"member_params": parameter_count(model),
                "parent_linear_params": figures["parent_params"] - plan.other_params,
                "dense_linear_params": plan.dense_params - plan.other_params,  # what a plan's keep is a fraction of
                "member_linear_params": plan.slot_params,
                "decomposed_perplexity": heldout_perplexity(model, cfg, hf_source) if changes else
                figures["parent_perplexity"],
                "heldout_tokens": cfg.eval.perplexity_blocks * (HELDOUT_BLOCK - 1), "in_domain": cfg.in_domain,
                "plan": request, "method": cfg.plrd.method,
                "calibration_tokens": samples * calib.seq_length if changes else 0, "hf_source": str(hf_source)}
    if rank0:
        plan.save(partial / "plan.json")
        (partial / "plan.txt").write_text(plan.table() + "\n")
    save_checkpoint(model, partial / "train" / DECOMPOSED, arch, hf_source)
    if rank0:  # written after the checkpoint: its presence says the decomposition is saved
        write_text_atomic(partial / "decomposed.json", json.dumps(figures, indent=1) + "\n")
    return model, figures


def train_batches(cfg: DecomposeConfig, hf_source: Path) -> tuple[DataParallelBatches, Optional[DataParallelBatches]]:
    """This rank's batches of the stage's training samples (its share of the stream), and of the valid split."""
    data, valid = _training_datasets(cfg, hf_source)

    def in_batches(split, first_sample: int = 0) -> DataParallelBatches:
        return DataParallelBatches(split, cfg.train.micro_batch, cfg.train.global_batch,
                                   parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                                   first_sample)

    return in_batches(data, cfg.train.first_sample), None if valid is None else in_batches(valid)


def train(cfg: DecomposeConfig, model: torch.nn.Module, arch: LlamaArch, latest: Path, partial: Path,
          hf_source: Path) -> list[dict]:
    """Continued pretraining from the checkpoint ``latest``; on rank 0 the metrics of every logged step (read
    back from the metrics file, so a resumed stage reports the steps taken before the interruption too)."""
    schedule = Schedule(cfg.train.steps, cfg.train.global_batch, cfg.train.warmup_steps, cfg.train.decay_style,
                        cfg.train.wsd_decay_steps)
    batches, valid = train_batches(cfg, hf_source)
    trainer = Trainer(model, cfg.optimizer_config(), schedule, batches, cfg.ddp_config(),
                      distill.stage_loss(cfg.train.loss, load_teacher(cfg), cfg.train.kd_weight))
    if latest.name != DECOMPOSED:
        trainer.load_state(dist_checkpointing.load(trainer.state(is_loading=True), str(latest)))
    metrics = partial / METRICS
    if _rank0():
        keep_saved_steps(metrics, trainer.iteration)

    def save(t: Trainer) -> None:
        path = partial / "train" / ITERATION.format(t.iteration)
        save_checkpoint(t.model, path, arch, hf_source, state=t.state())
        if _rank0():  # only the newest is kept: a training checkpoint holds the optimizer's state
            for older in partial.glob("train/iter_*"):
                if older != path:
                    shutil.rmtree(older)
        dist.barrier()

    interval = cfg.train.save_interval or cfg.train.steps
    run(trainer, save, interval, metrics, cfg.train.log_interval, progress=_rank0(), valid=valid,
        eval_interval=cfg.train.eval_interval, eval_iters=cfg.train.eval_iters)
    model.float()  # bf16_mixed trained it in bf16: perplexity, checkpoint and export read its weights widened to fp32
    if not _rank0():  # rank 0 writes the metrics and alone reports them
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _teacher_source(cfg: DecomposeConfig) -> Path:
    """``parent`` / ``previous``: this stage's parent (a family resolves ``parent`` to its own)."""
    return _folder(cfg.parent if cfg.train.teacher in TEACHERS else cfg.train.teacher)


def check_teacher_source(cfg: DecomposeConfig) -> None:
    """Before any work: the teacher must have the student's architecture and tokenizer (configs only)."""
    distill.check_teacher_source(_folder(cfg.parent), _teacher_source(cfg), f"train.teacher={cfg.train.teacher!r}")


def load_teacher(cfg: DecomposeConfig) -> Optional[torch.nn.Module]:
    """The distillation teacher (None for the LM loss) at the student's TP layout, frozen."""
    return None if cfg.train.loss == "lm" else distill.load_teacher(_teacher_source(cfg), cfg.train_dtype)


def run_stage(cfg: DecomposeConfig, evaluate_now: bool = True, parent_perplexity: Optional[dict] = None
              ) -> Optional[dict]:
    """The stage (megatron's parallel state initialised by ``init_parallel``); on rank 0 its figures.

    A stage whose ``output`` exists is complete: its figures are read back, nothing is redone.
    ``parent_perplexity``: the parent's held-out perplexity where a family has measured it already (a
    stage's parent is the member the previous stage trained), so the forward passes are not repeated;
    every rank passes the same (they are collective).
    """
    start = time.perf_counter()
    out, partial = Path(cfg.output), partial_folder(cfg.output)
    if exists_on_rank0(out):
        claim(out, cfg, finished=True)
        if _rank0():  # a run stopped between the rename and this cleanup left the optimizer's state
            shutil.rmtree(out / "train", ignore_errors=True)
        return json.loads((out / "summary.json").read_text()) if _rank0() else None
    hf_source = check_inputs(cfg)  # the parent's HF config and tokenizer
    claim(partial, cfg, untrained=lambda: _untrained(partial))
    latest, decomposed = rank0_decides(lambda: (_latest(partial / "train"), (partial / "decomposed.json").is_file()))
    if latest is None or not decomposed:
        if _rank0():  # a decomposition interrupted before its record was written: done again
            shutil.rmtree(partial / "train", ignore_errors=True)
        dist.barrier()
        model, figures = decompose(cfg, partial, parent_perplexity)
        latest = partial / "train" / DECOMPOSED
    else:
        model, _ = (build_model if cfg.train.steps and latest.name != DECOMPOSED else load_model)(latest)
        figures = json.loads((partial / "decomposed.json").read_text())
    arch = read_metadata(latest)[0]
    logged = train(cfg, model, arch, latest, partial, hf_source) if cfg.train.steps else []
    losses = [row["loss"] for row in logged]
    figures["member_perplexity"] = heldout_perplexity(model, cfg, hf_source) if cfg.train.steps else \
        figures["decomposed_perplexity"]
    figures["valid_losses"] = [[row["step"], row["valid_loss"]] for row in logged if "valid_loss" in row]

    if not exists_on_rank0(partial / "checkpoint"):
        save_checkpoint(model, partial / "checkpoint", arch, hf_source)
    for format in cfg.export:
        if not exists_on_rank0(partial / f"hf-{format}"):
            export_hf(model, partial / f"hf-{format}", hf_source, format=format, dtype=cfg.export_dtype)
    if not _rank0():
        return None  # the rest is rank 0's alone: lm-eval can outlast any collective's timeout
    figures |= {"train_tokens": cfg.train.tokens, "train_losses": losses, "tp": cfg.parallel.tensor_model_parallel_size,
                "dp": parallel_state.get_data_parallel_world_size(), "seconds": time.perf_counter() - start}
    if evaluate_now and cfg.eval.tasks:
        figures |= evaluate_member(cfg, partial, partial / "eval")
    (partial / "summary.json").write_text(json.dumps(figures, indent=1) + "\n")
    (partial / "summary.md").write_text("\n".join(report.stage_summary(cfg, figures)) + "\n")
    finish(partial, out)
    shutil.rmtree(out / "train")  # the optimizer's state: the stage is done
    return figures


def lm_eval_only(settings: EvalConfig) -> dict:
    """``evaluate``'s arguments for a stage's or a family's export: the lm-eval tasks alone. The held-out perplexity
    was measured on the megatron model the export was written from (``heldout_perplexity``), and the export measures
    the same (tests/test_recipes.py): measured again, it doubled SmolLM2-135M's evaluation (bench/member_eval.py)."""
    return vars(settings) | {"perplexity_blocks": 0}


def evaluate_member(cfg: DecomposeConfig, folder: Path, results: Path) -> dict:
    """lm-eval on the stage's first export in ``folder``, written to ``results`` (kept: read back on a rerun)."""
    if not (results / "results.json").is_file():
        start = time.perf_counter()
        result = evaluate(folder / f"hf-{cfg.export[0]}", **lm_eval_only(cfg.eval))
        result["seconds"] = time.perf_counter() - start
        write_results(result, results)
    result = json.loads((results / "results.json").read_text())
    return {"eval": result, "eval_seconds": result["seconds"]}


def summary(stage: DecomposeConfig) -> dict:
    """A finished stage's figures, as every rank reads them (rank 0 wrote them before the barrier)."""
    return json.loads((Path(stage.output) / "summary.json").read_text())


@keys_under("stage.")
def run_family(cfg: FamilyConfig, progress: Callable[[str], None] = print) -> Optional[list[str]]:
    """The family (parallel state initialised for its stages); on rank 0 the report's lines (a stage's refusal
    names its key as the family has it, under ``stage.``)."""
    start = time.perf_counter()
    out, partial = Path(cfg.output), partial_folder(cfg.output)
    if exists_on_rank0(out):
        claim(out, cfg, finished=True)
        if _rank0():
            progress(f"{out} is complete (same config): nothing to do")
            return (out / "family.md").read_text().splitlines()
        return None
    check_inputs(cfg.stage_config(0, cfg.parent, str(partial)))  # every stage reads the same stream and held-out texts
    claim(partial, cfg, untrained=lambda: _family_untrained(partial), section="stage.")
    parent, stages, measured = cfg.parent, [], None  # measured: the held-out perplexity of ``parent``
    for index, keep in enumerate(cfg.keep):
        stage = cfg.stage_config(index, parent, str(partial))
        if _rank0():
            done = " (done: kept as it is)" if Path(stage.output).is_dir() else ""
            progress(f"\n=== stage {index + 1} of {len(cfg.keep)}: keep {keep:g} of the dense linear-layer "
                     f"parameters, from {parent}{done}")
        run_stage(stage, evaluate_now=False, parent_perplexity=measured)
        dist.barrier()  # rank 0 renames the stage's folder: its checkpoint is the next parent
        stages.append(stage)
        parent, measured = str(Path(stage.output) / "checkpoint"), summary(stage)["member_perplexity"]
    baselines = {name: cfg.baseline_config(name, str(partial)) for name in cfg.baselines}
    for name, baseline in baselines.items():
        if _rank0():
            done = " (done: kept as it is)" if Path(baseline.output).is_dir() else ""
            progress(f"\n=== baseline {name}: {BASELINES[name]}, from {cfg.parent}{done}")
        run_stage(baseline, evaluate_now=False, parent_perplexity=summary(stages[0])["parent_perplexity"])
        dist.barrier()
    if not _rank0():
        return None

    def figures(stage: DecomposeConfig) -> dict:
        folder = Path(stage.output)
        result = summary(stage)
        if stage.eval.tasks:
            result |= evaluate_member(stage, folder, partial / "eval" / folder.name)
        return result

    members = [figures(stage) for stage in stages]
    baseline_figures = {name: figures(baseline) for name, baseline in baselines.items()}
    parent_eval = evaluate_parent(cfg.parent, stages[0], partial / "eval" / "parent")
    lines = report.family_report(cfg, parent_eval, members, baseline_figures, time.perf_counter() - start)
    (partial / "family.json").write_text(json.dumps({"keep": cfg.keep, "parent_eval": parent_eval, "members": members,
                                                     "baselines": baseline_figures}, indent=1) + "\n")
    (partial / "family.md").write_text("\n".join(lines) + "\n")
    report.plot_family(cfg, members, baseline_figures, partial / "family.png")
    finish(partial, out)
    return lines


def evaluate_parent(parent: str, stage: DecomposeConfig, results: Path) -> Optional[dict]:
    """lm-eval on the parent with the stages' settings, for the report's first row (an HF parent only:
    a PLRD checkpoint parent was evaluated as the member it is)."""
    folder = _folder(parent)
    if not stage.eval.tasks or (folder / "metadata.json").is_file():
        return None
    if not (results / "results.json").is_file():
        write_results(evaluate(folder, **lm_eval_only(stage.eval)), results)
    return json.loads((results / "results.json").read_text())
