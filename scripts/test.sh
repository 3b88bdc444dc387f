#!/usr/bin/env bash
# Install what is missing, then run the whole test suite:
#   1. single-process tests (math, configs, CLI, conversion);
#   2. tensor-parallel tests, all in one 2-process torchrun group (TP=1 and TP=2 cases);
#   3. the Megatron-Bridge lane (scripts/test_bridge.sh) in its own venv, .venv-bridge: tests/bridge/
#      against Bridge's real code, and the training, data, decomposition and tensor-parallel tests
#      again on its megatron-core 0.19. Skipped with --latest (its set is pinned).
# Lanes 1 and 3 each run one single-threaded pytest process, so lane 3 runs beside lanes 1 and 2 (its
# output printed when it ends): on 2 cores the suite takes the longest lane's time, not the sum. Lane 3's
# TP tests run last, alone (about a minute): beside the other lanes' multi-process tests, they once lost a
# gloo connection.
# Extra arguments go to every pytest run; the single-process and Bridge runs print their ten slowest tests
# (the suite's budget is 30 min). `--latest` first runs the suite in a throw-away venv with the newest releases
# instead of the tested set (what a user installing today gets).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

VENV=.venv
if [ "${1:-}" = "--latest" ]; then
  shift
  VENV=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$VENV")"' EXIT
  bash scripts/setup.sh --latest "$VENV"
  echo "[latest] versions that differ from constraints.txt ('<' pinned, '>' newest):"
  diff <(grep -v '^#' constraints.txt | LC_ALL=C sort -f) \
       <("$VENV/bin/pip" freeze --all --exclude-editable | LC_ALL=C sort -f) || true
else
  bash scripts/setup.sh
fi
python=$VENV/bin/python

if [ "$VENV" = .venv ]; then
  bridge_log=$(mktemp)
  # A session of its own, so that an early exit (a failed lane, Ctrl-C) stops it and all it started:
  # SIGTERM reaches pytest and the torchrun launchers, which stop their workers.
  setsid bash scripts/test_bridge.sh --no-tp "$@" >"$bridge_log" 2>&1 &
  bridge=$!
  trap 'kill -TERM -- "-$bridge" 2>/dev/null || true; rm -f "$bridge_log"' EXIT
  echo "[test] the Bridge lane runs beside the others; its output follows theirs"
fi

status=0
"$python" -m pytest -q --durations=10 --ignore=tests/distributed --ignore=tests/bridge "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi  # 5: no tests collected

bash scripts/test_tp.sh "$python" "$@"
if [ "$VENV" != .venv ]; then exit 0; fi

status=0
wait "$bridge" || status=$?
echo "=== the Bridge lane (.venv-bridge: megatron-core 0.19, Megatron-Bridge)"
cat "$bridge_log"
if [ "$status" -ne 0 ]; then exit "$status"; fi
echo "=== the tensor-parallel tests on megatron-core 0.19 (.venv-bridge), last and alone"
bash scripts/test_tp.sh .venv-bridge/bin/python "$@"
