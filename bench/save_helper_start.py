"""What a Bridge stage's first checkpoint save waits for on each rank: its helper process importing the job's script.

    .venv-bridge/bin/python bench/save_helper_start.py [--repeats 3]

megatron's checkpoint writer collects its results through a ``multiprocessing`` manager started with
``spawn`` on each rank's first save; a spawned process imports the main script again (as ``__mp_main__``)
before it serves. ``recipes/run_plrd.py`` imports torch and megatron inside ``main`` since 2026-12-07;
before, its top level imported them (``nemo_plrd.hf``). The manager is started from a fresh interpreter
whose main script is each version of run_plrd.py, interleaved, and timed to its first queue.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import speedup_table  # bench/ is on sys.path when this runs as a script

from nemo_plrd.cli import positive_int

RUN_PLRD = Path(__file__).resolve().parents[1] / "recipes" / "run_plrd.py"
# The job's script as the main module, as under `python recipes/run_plrd.py` (not run: its main is guarded).
START = """
import sys, time
sys.modules["__main__"] = type(sys)("__main__")
sys.modules["__main__"].__file__ = sys.argv[1]
import multiprocessing
start = time.perf_counter()
multiprocessing.get_context("spawn").Manager().Queue()
print(time.perf_counter() - start)
"""


def seconds(script: Path) -> float:
    result = subprocess.run([sys.executable, "-c", START, str(script)], capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        before = Path(folder) / "run_plrd.py"
        before.write_text("import nemo_plrd.hf  # noqa: F401  (torch and megatron at the top)\n" + RUN_PLRD.read_text())
        times = {"before": [], "now": []}
        for _ in range(args.repeats):
            times["before"].append(seconds(before))
            times["now"].append(seconds(RUN_PLRD))
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"the manager's start, median of {args.repeats} interleaved rounds, each in a fresh interpreter")
    print(speedup_table("recipes/run_plrd.py", ("torch and megatron imported at the top", median["before"]),
                        ("imported in main (now)", median["now"])))


if __name__ == "__main__":
    main()
