#!/usr/bin/env bash
# The Megatron-Bridge test lane alone (scripts/test.sh runs it beside the others): install what is
# missing into .venv-bridge, then run tests/bridge/ against Bridge's real code and the training, data,
# decomposition and tensor-parallel tests again on its megatron-core 0.19. Extra arguments go to both pytest
# runs (options such as -k or -x; a test path would run in the TP group too). With --no-tp first, the TP run
# is left to the caller: scripts/test.sh runs it last, alone (in the one CI run where it ran beside the other
# lanes' multi-process tests, rank 0 lost a gloo connection while building megatron's groups).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tp=1
if [ "${1:-}" = --no-tp ]; then tp=0; shift; fi
bash scripts/setup.sh --bridge
status=0
.venv-bridge/bin/python -m pytest -q --durations=10 -p no:cacheprovider tests/bridge tests/test_train.py \
  tests/test_data.py tests/test_decompose.py "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then exit "$status"; fi  # 5: no tests collected
if [ "$tp" = 1 ]; then bash scripts/test_tp.sh .venv-bridge/bin/python "$@"; fi
