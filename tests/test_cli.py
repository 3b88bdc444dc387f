import re
import subprocess
import sys


def plrd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemo_plrd.cli", *args],
                          capture_output=True, text=True, timeout=600)


def test_demo_refuses_a_tp_size_that_does_not_divide_the_kv_heads():
    result = plrd("demo", "--tp", "2")
    assert result.returncode == 2
    assert "--tp 2 does not divide SmolLM2-135M's 3 KV heads; use 1 or 3" in result.stderr


def test_demo_refuses_non_positive_numbers():
    result = plrd("demo", "--steps", "0")
    assert result.returncode == 2 and "0 is not a positive integer" in result.stderr


def test_demo_reports_smollm2_parameter_count_and_smaller_low_rank_model():
    result = plrd("demo", "--tp", "1", "--steps", "1", "--seq-length", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if re.match(r"\s*(dense|low-rank)\s+\d", line)}
    # HF's SmolLM2-135M has 134,515,008 parameters (tied embeddings).
    assert rows["dense"][1] == "134.5M"
    assert float(rows["low-rank"][1].rstrip("M")) < 100


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
