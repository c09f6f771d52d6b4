#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv at .venv and install deepgen_rl with its test extras.
#
#   bash scripts/setup_venv.sh && source .venv/bin/activate
#
# torch is installed FIRST and pinned: left to the resolver, a dependency asking for plain `torch` can pull
# a multi-GB build. Then the package and its test extras; DeepSpeed is built without its C++/CUDA ops
# (DS_BUILD_OPS=0). Re-running reinstalls only when pyproject.toml changed.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="$repo_root/.venv"
python_bin="${PYTHON:-python3.11}"
torch_version="2.13.0"

if [ ! -x "$venv/bin/python" ]; then
    command -v "$python_bin" >/dev/null 2>&1 || {
        echo "[setup_venv.sh] ERROR: $python_bin not found; install Python 3.11 (or 3.12) or set PYTHON=/path/to/python3.12" >&2
        exit 1
    }
    echo "[setup_venv.sh] creating $venv with $python_bin"
    "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

stamp="$venv/.deepgen_rl_install_stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup_venv.sh] installing torch==$torch_version first, then deepgen_rl[test] (a few minutes)"
    "$py" -m pip install --quiet --upgrade pip
    "$py" -m pip install --quiet "torch==$torch_version"
    DS_BUILD_OPS=0 "$py" -m pip install --quiet -e ".[test]"
    installed_torch="$("$py" -c 'import torch; print(torch.__version__)')"
    case "$installed_torch" in
        "$torch_version"*) ;;
        *) echo "[setup_venv.sh] ERROR: expected torch $torch_version, found $installed_torch" >&2; exit 1 ;;
    esac
    echo "$want" > "$stamp"
fi
