#!/usr/bin/env bash
# Install what is missing, then run the whole test suite:
#   1. single-process tests (math, configs, CLI, conversion);
#   2. tensor-parallel tests, all in one 2-process torchrun group (TP=1 and TP=2 cases).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

status=0
.venv/bin/python -m pytest -q --ignore=tests/distributed "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi  # 5: no tests collected

# Rank 0 reports on the console; rank 1's output goes to a log, shown if the run fails
# (a failure on either rank fails the run).
logs=$(mktemp -d)
status=0
.venv/bin/torchrun --nproc_per_node 2 --log-dir "$logs" --redirects 1:3 \
  -m pytest -q -p no:cacheprovider tests/distributed "$@" || status=$?
if [ "$status" -ne 0 ]; then
  for log in "$logs"/*/attempt_0/1/stdout.log "$logs"/*/attempt_0/1/stderr.log; do
    echo "=== rank 1: $log (last 200 lines)"
    tail -n 200 "$log"
  done
fi
rm -rf "$logs"
exit "$status"
