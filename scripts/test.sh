#!/usr/bin/env bash
# Set up (or reuse) the project's virtualenv (scripts/setup_venv.sh) and run the test suite.
#
#   bash scripts/test.sh              # install if needed, then run all tests
#   bash scripts/test.sh -k rollout   # extra arguments go to pytest
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup_venv.sh

export PYTHONUNBUFFERED=1
# Tests never reach a hub; keep libraries from trying.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}" SWANLAB_MODE="${SWANLAB_MODE:-disabled}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

exec "$repo_root/.venv/bin/python" -m pytest "$@"
