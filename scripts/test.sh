#!/usr/bin/env bash
# Set up (or reuse) the project's virtualenv and run the test suite.
#
#   bash scripts/test.sh              # install if needed, then run all tests
#   bash scripts/test.sh -k rollout   # extra arguments go to pytest
#
# torch is installed FIRST and pinned: left to the resolver, a dependency asking
# for plain `torch` pulls a multi-GB CUDA build. Then the package and its test
# extras; deepspeed is built without its C++/CUDA ops (DS_BUILD_OPS=0).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="$repo_root/.venv"
python_bin="${PYTHON:-python3.11}"
torch_version="2.13.0"

if [ ! -x "$venv/bin/python" ]; then
    echo "[test.sh] creating $venv with $python_bin"
    "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

# Reinstall only when the package metadata changed since the last install.
stamp="$venv/.deepgen_rl_install_stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[test.sh] installing torch==$torch_version (CPU) first, then deepgen_rl[test]"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==$torch_version"
    DS_BUILD_OPS=0 "$py" -m pip install --quiet -e ".[test]"
    installed_torch="$("$py" -c 'import torch; print(torch.__version__)')"
    case "$installed_torch" in
        "$torch_version"*) ;;
        *) echo "[test.sh] ERROR: expected torch $torch_version, found $installed_torch" >&2; exit 1 ;;
    esac
    echo "$want" > "$stamp"
fi

export PYTHONUNBUFFERED=1
# Tests never reach a hub; keep libraries from trying.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}" SWANLAB_MODE="${SWANLAB_MODE:-disabled}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

exec "$py" -m pytest "$@"
