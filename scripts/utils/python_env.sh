# Shared by scripts/reward_ocr.sh and scripts/reward_server.sh (sourced, not run): which python runs our servers.
#
# After `source`, call:   pick_python   -> sets python_bin: $PYTHON, else the active virtualenv / conda env,
#                                          else the repo's .venv, else python3 (needs repo_root set)

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        python_bin="$PYTHON"
    elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
        python_bin="$VIRTUAL_ENV/bin/python"
    elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
        python_bin="$CONDA_PREFIX/bin/python"
    elif [ -x "$repo_root/.venv/bin/python" ]; then
        python_bin="$repo_root/.venv/bin/python"
    else
        python_bin="$(command -v python3 || command -v python || true)"
        [ -n "$python_bin" ] || { echo "error: no python found: activate the server's environment or set" \
            "PYTHON=/path/to/python." >&2; exit 2; }
    fi
}
