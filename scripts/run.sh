#!/usr/bin/env bash
# Install what is missing, then run the main job: the PLRD family of the embedded SmolLM2-135M.
# Arguments are recipe overrides, e.g. bash scripts/run.sh 'keep=[0.5]' 'baselines=[control]' stage.train.steps=100 output=runs/other
# Interrupted, the same command resumes; a finished family is reported, not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python recipes/family.py --config recipes/smollm2_135m_family.yaml "$@"
