#!/usr/bin/env bash
# Install what is missing, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/plrd demo "$@"
