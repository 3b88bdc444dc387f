import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_plrd.demo import half_break_even_ranks
from nemo_plrd.model import SMOLLM2_135M

ROOT = Path(__file__).resolve().parents[1]


def plrd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_plrd.cli", *args],
                          capture_output=True, text=True, timeout=600)


def test_demo_refuses_a_layout_or_sequence_smollm2_cannot_take(plrd_here):
    for args, message in ((("--tp", "2"), "--tp 2 does not divide SmolLM2-135M's 3 KV heads; use 1 or 3"),
                          (("--seq-length", "100000"), "--seq-length 100000 is longer than SmolLM2-135M's 8192 "
                                                       "positions")):  # before: an out-of-memory traceback
        result = plrd_here("demo", *args)
        assert result.returncode == 2 and message in result.stderr


def test_numeric_options_refuse_what_they_cannot_take_naming_the_option():
    for args, message in ((("demo", "--steps", "0"), "argument --steps: '0' is not a positive integer"),
                          (("demo", "--tp", "abc"), "argument --tp: 'abc' is not a positive integer"),
                          (("submit", "recipes/llama2_7b_family.yaml", "--nodes", "1", "--gpus-per-node", "8",
                            "--port", "70000"), "argument --port: '70000' is not a TCP port (1-65535)")):
        result = plrd(*args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_demo_reports_smollm2_parameter_count_and_smaller_low_rank_model():
    result = plrd("demo", "--tp", "1", "--steps", "1", "--seq-length", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if re.match(r"\s*(dense|low-rank)\s+\d", line)}
    # HF's SmolLM2-135M has 134,515,008 parameters (tied embeddings).
    assert rows["dense"][1] == "134.5M"
    # each slot's [out, in] weight becomes [out, r] x [r, in] at half its break-even rank, in each of the 30 layers
    ranks = half_break_even_ranks(SMOLLM2_135M)
    saved = sum(out * inp - ranks[slot] * (out + inp) for slot, (out, inp) in SMOLLM2_135M.slot_shapes().items())
    assert rows["low-rank"][1] == f"{(134_515_008 - SMOLLM2_135M.num_layers * saved) / 1e6:.1f}M"


def run_script_raising(error: str) -> subprocess.CompletedProcess:
    code = ("import torch\nfrom nemo_plrd.cli import run_script\nfrom nemo_plrd.errors import InputError\n"
            f"def main():\n    {error}\nrun_script(main)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_scripts_refuse_bad_input_in_one_line_and_keep_the_traceback_of_a_bug():
    refused = run_script_raising("raise InputError('train.lr=-1 must be a number > 0')")
    assert (refused.returncode, refused.stderr) == (2, "error: train.lr=-1 must be a number > 0\n")
    # A ValueError raised inside torch (or transformers, or megatron) is a bug, not bad input.
    bug = run_script_raising("torch.distributions.Normal(0.0, -1.0)")
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and "ValueError: Expected parameter scale" in bug.stderr


def test_plrd_eval_refuses_a_misspelt_task_before_loading_megatron():
    """plrd eval reads HF models alone: its flags are checked without megatron's import (9 s of a CPU core here, where
    the refusal takes 2)."""
    code = ("import sys\nfrom nemo_plrd.cli import main\ntry:\n    main(['eval', '/nowhere', '--tasks', 'pica'])\n"
            "except SystemExit as exit:\n    print('exit', exit.code)\nprint('megatron loaded:', 'megatron' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--tasks: unknown task(s) ['pica']" in result.stderr
    assert result.stdout.splitlines() == ["exit 2", "megatron loaded: False"], result.stdout


@pytest.mark.parametrize("script", ["recipes/decompose.py", "recipes/family.py", "conversion/hf_to_megatron.py",
                                    "conversion/megatron_to_hf.py", "conversion/bridge_to_plrd.py"])
def test_a_script_answers_help_before_loading_torch(script):
    """Arguments are parsed first: --help and a usage error do not wait on torch and megatron."""
    code = (f"import runpy, sys\nsys.argv = [{script!r}, '--help']\ntry:\n    runpy.run_path({script!r}, "
            f"run_name='__main__')\nexcept SystemExit:\n    pass\nprint('torch loaded:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "usage:" in result.stdout and result.stdout.rstrip().endswith("torch loaded: False"), result.stdout
