#!/usr/bin/env bash
# Create or refresh a virtualenv with everything nemo-plrd needs (default: the project-local .venv).
#   bash scripts/setup.sh                  # .venv, exactly the tested set in constraints.txt
#   bash scripts/setup.sh --bridge         # .venv-bridge: the Megatron-Bridge test lane (tests/bridge/)
#   bash scripts/setup.sh --latest DIR     # a venv in DIR with the newest releases (torch stays pinned)
# Idempotent: pip runs again only when setup.py, the constraint set, this script or the venv's Python changed
# since the last install. Linux (x86_64 / aarch64) with bash >= 4.4: the pinned torch is PyTorch's +cpu build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
CONSTRAINTS=constraints.txt
LATEST=0
BRIDGE=0
case "${1:-}" in
  "") ;;
  --latest) LATEST=1; VENV=${2:?usage: setup.sh --latest VENV_DIR} ;;
  --bridge) BRIDGE=1; VENV=.venv-bridge; CONSTRAINTS=tests/bridge/constraints.txt ;;
  *) echo "[setup] unknown argument '$1': give none, --bridge or --latest VENV_DIR" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
# One setup at a time (scripts/run.sh and scripts/test.sh started together would both build .venv).
if command -v flock >/dev/null; then
  mkdir -p .cache
  exec 9>.cache/setup.lock
  flock -n 9 || { echo "[setup] waiting for another scripts/setup.sh to finish"; flock 9; }
fi
# A venv whose creation was cut short (Ctrl-C, no ensurepip) has a python but no pip: made again.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then  # never remove what is not a venv
    echo "[setup] $VENV exists and is not a virtualenv (no pyvenv.cfg): give another folder" >&2; exit 2
  fi
  echo "[setup] creating $VENV with $($PYTHON --version)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV" || {
    echo "[setup] '$PYTHON -m venv' failed: on Debian / Ubuntu, install python3-venv (apt install python3.X-venv)" >&2
    rm -rf "$VENV"; exit 1; }
fi
pip=("$VENV/bin/pip" --quiet)
TORCH=$(grep '^torch==' constraints.txt | cut -d= -f3) || {  # the CPU build, e.g. 2.13.0+cpu
  echo "[setup] constraints.txt pins no torch== (the CPU build every install takes)" >&2; exit 1; }
# PyPI's Linux torch is the CUDA build; the CPU build is on PyTorch's own index. Taken from the indexes
# pip is configured with where they have it (a local wheel house, a mirror), else from PyTorch's.
install_torch() {
  "${pip[@]}" install "$@" || {
    echo "[setup] no $TORCH on pip's configured indexes; trying https://download.pytorch.org/whl/cpu"
    "${pip[@]}" install --retries 1 --timeout 30 --extra-index-url https://download.pytorch.org/whl/cpu "$@"; }
}
# The installed set as the constraint file lists it (its header comments aside).
frozen() { "$VENV/bin/pip" freeze --all --exclude-editable | LC_ALL=C sort -f; }
pinned() { grep -v '^#' "$CONSTRAINTS" | LC_ALL=C sort -f; }

if [ "$LATEST" = 1 ]; then
  echo "[setup] installing the newest releases into $VENV"
  "${pip[@]}" install --upgrade pip setuptools
  # torch stays pinned in every call: an unpinned `torch` pulls GBs of CUDA wheels (an eager upgrade
  # would take one).
  install_torch "torch==$TORCH"
  "${pip[@]}" install --upgrade --upgrade-strategy eager -e ".[test]" "torch==$TORCH"
  exit 0
fi

extra=()
if [ "$BRIDGE" = 1 ]; then extra=(-r tests/bridge/requirements.txt); fi
stamp="$VENV/.nemo-plrd-installed-$( ("$VENV/bin/python" --version; cat scripts/setup.sh setup.py "$CONSTRAINTS" \
  "${extra[@]:1}" $([ "$BRIDGE" = 1 ] && echo tests/bridge/nemo-run.txt)) | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing nemo-plrd and the tested set ($CONSTRAINTS) into $VENV"
  "${pip[@]}" install -c "$CONSTRAINTS" pip setuptools
  # torch first, from the constraint set: nothing later can ask for a CUDA build.
  install_torch -c "$CONSTRAINTS" torch
  if [ "$BRIDGE" = 1 ]; then
    # megatron-core >= 0.17 and megatron-bridge declare Python >= 3.12 but run on 3.11 (their wheels
    # are cp311 / pure Python), and Bridge's own requirements pull CUDA builds: both go in without
    # their dependencies, and tests/bridge/requirements.txt names what they import at start-up.
    "${pip[@]}" install --no-deps --ignore-requires-python -c "$CONSTRAINTS" megatron-core megatron-bridge
    # nemo-run and what it imports, --no-deps too: its declared requirements conflict with Bridge's set.
    "${pip[@]}" install --no-deps -c "$CONSTRAINTS" -r tests/bridge/nemo-run.txt
  fi
  # built with the pinned setuptools just installed, not the newest one build isolation would fetch
  "${pip[@]}" install --no-build-isolation -c "$CONSTRAINTS" -e ".[test]" "${extra[@]}"
  # Anything extra or at another version means this venv is not what CI tested.
  if ! drift=$(diff <(pinned) <(frozen)); then
    echo "[setup] $VENV differs from $CONSTRAINTS ('<' pinned, '>' installed):" >&2
    echo "$drift" >&2
    echo "[setup] remove $VENV and run again, or regenerate $CONSTRAINTS (see its header)" >&2
    exit 1
  fi
  rm -f "$VENV"/.nemo-plrd-installed-*
  touch "$stamp"
fi
