#!/usr/bin/env bash
# The tensor-parallel tests (tests/distributed: TP=1 and TP=2 cases) in one 2-process torchrun group,
# with the venv's python given first (scripts/test.sh runs them on .venv's megatron-core 0.16, then last
# on .venv-bridge's 0.19; scripts/test_bridge.sh alone on 0.19). Extra arguments go to pytest.
# Rank 0 reports on the console; rank 1's output goes to a log, shown if the run fails (a failure on
# either rank fails the run). --standalone takes a free rendezvous port, not torchrun's fixed 29500.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:?usage: scripts/test_tp.sh VENV_PYTHON [pytest args]}
shift
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
status=0
"$python" -m torch.distributed.run --standalone --nproc_per_node 2 --log-dir "$logs" --redirects 1:3 \
  -m pytest -q -p no:cacheprovider tests/distributed "$@" || status=$?
if [ "$status" -ne 0 ]; then
  shopt -s nullglob  # torchrun stopped before its workers (a rendezvous failure) left no rank log
  for log in "$logs"/*/attempt_0/1/stdout.log "$logs"/*/attempt_0/1/stderr.log; do
    echo "=== rank 1: $log (last 200 lines)"
    tail -n 200 "$log" || true
  done
fi
exit "$status"
