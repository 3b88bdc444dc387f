#!/usr/bin/env bash
# Create or refresh the project-local virtualenv (.venv) with everything nemo-plrd needs.
# Idempotent: re-runs pip only when setup.py changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.nemo-plrd-installed-$(sha256sum setup.py | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing nemo-plrd and its dependencies into $VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # Pin torch before anything can ask for it: an unpinned `torch` pulls GBs of CUDA wheels.
  "$VENV/bin/pip" install --quiet "torch==2.13.0"
  "$VENV/bin/pip" install --quiet -e ".[test]"
  rm -f "$VENV"/.nemo-plrd-installed-*
  touch "$stamp"
fi
