#!/usr/bin/env bash
# Set up (or reuse) the project's virtualenv (scripts/setup_venv.sh) and run the test suite.
#
#   bash scripts/test.sh              # install if needed, then run all tests
#   bash scripts/test.sh -k rollout   # extra arguments go to pytest
#   PYTEST_WORKERS=0 bash scripts/test.sh   # one process (default: 2 pytest-xdist workers, one test file each)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
bash scripts/setup_venv.sh

export PYTHONUNBUFFERED=1
# Tests never reach a hub; keep libraries from trying.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}" SWANLAB_MODE="${SWANLAB_MODE:-disabled}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

# Two workers by default: most tests wait on subprocesses (torchrun, servers) or run one thread, so a 2-core machine
# finishes the suite in ~3/4 of the time. --dist loadfile keeps a file's tests (and its module fixtures: one
# expensive run asserted many ways) in one worker; conftest.py starts the slowest files first.
workers="${PYTEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
    exec "$repo_root/.venv/bin/python" -m pytest "$@"
fi
# --no-loadscope-reorder: hand the files out in collection order (xdist would otherwise start the files with the
# most tests first, leaving the one-test whole-training files for last).
exec "$repo_root/.venv/bin/python" -m pytest -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
