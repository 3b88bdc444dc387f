"""With this folder (and tests/bridge) on PYTHONPATH, every torchrun worker starts with the lane's CPU stand-ins:
a command rendered for a cluster runs here unchanged. Only workers (LOCAL_RANK set) need them: torchrun's
launcher and the evaluation (HF only) never touch CUDA or Bridge, and skip the stand-ins' imports."""

import os

if "LOCAL_RANK" in os.environ:
    import cpu_shims

    cpu_shims.install()
