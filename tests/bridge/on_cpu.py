"""Run a script with the lane's CPU stand-ins in front: ``python on_cpu.py SCRIPT ARGS...`` (torchrun too).

So that the command a test runs is the user's command (``recipes/run_plrd.py ...``) on a machine
without CUDA.
"""

import runpy
import sys

if __name__ == "__main__":
    import cpu_shims

    cpu_shims.install()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
