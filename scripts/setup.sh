#!/usr/bin/env bash
# Create or refresh a virtualenv with everything nemo-plrd needs (default: the project-local .venv).
#   bash scripts/setup.sh                  # .venv, exactly the tested set in constraints.txt
#   bash scripts/setup.sh --latest DIR     # a venv in DIR with the newest releases (torch stays 2.13.0)
# Idempotent: pip runs again only when setup.py or constraints.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
LATEST=0
if [ "${1:-}" = "--latest" ]; then
  LATEST=1
  VENV=${2:?usage: setup.sh --latest VENV_DIR}
fi
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/pip" --quiet)
# The installed set as constraints.txt lists it (its header comments aside).
frozen() { "$VENV/bin/pip" freeze --all --exclude-editable | LC_ALL=C sort -f; }
pinned() { grep -v '^#' constraints.txt | LC_ALL=C sort -f; }

if [ "$LATEST" = 1 ]; then
  echo "[setup] installing the newest releases into $VENV"
  "${pip[@]}" install --upgrade pip setuptools
  # torch stays pinned in every call: an unpinned `torch` pulls GBs of CUDA wheels (an eager upgrade
  # would take one); 2.13.0 is the CPU build here.
  "${pip[@]}" install "torch==2.13.0"
  "${pip[@]}" install --upgrade --upgrade-strategy eager -e ".[test]" "torch==2.13.0"
  exit 0
fi

stamp="$VENV/.nemo-plrd-installed-$(cat setup.py constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing nemo-plrd and the tested set (constraints.txt) into $VENV"
  "${pip[@]}" install -c constraints.txt pip setuptools
  # torch first, from the constraint set: nothing later can ask for a CUDA build.
  "${pip[@]}" install -c constraints.txt torch
  "${pip[@]}" install -c constraints.txt -e ".[test]"
  # Anything extra or at another version means this venv is not what CI tested.
  if ! drift=$(diff <(pinned) <(frozen)); then
    echo "[setup] $VENV differs from constraints.txt ('<' pinned, '>' installed):" >&2
    echo "$drift" >&2
    echo "[setup] remove $VENV and run again, or regenerate constraints.txt (see its header)" >&2
    exit 1
  fi
  rm -f "$VENV"/.nemo-plrd-installed-*
  touch "$stamp"
fi
