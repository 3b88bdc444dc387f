"""The Megatron-Bridge lane (run by scripts/test.sh in .venv-bridge): Bridge's real code on CPU.

The CPU stand-ins go in before anything imports Bridge; they cover hardware and Python-version
gaps only (tests/bridge/cpu_shims.py).
"""

import cpu_shims

cpu_shims.install()
