#!/usr/bin/env bash
# Start the OCR reward server (ours: FastAPI + uvicorn, JSON + base64 PNG; RapidOCR offline by default,
# PaddleOCR when installed) for the `ocr` reward.
#
#   bash scripts/reward_ocr.sh                  # serve on 0.0.0.0:18082
#   OCR_PORT=19000 bash scripts/reward_ocr.sh   # another port (then OCR_URL=http://<host>:19000 for training)
#   bash scripts/reward_ocr.sh --engine rapidocr --case-sensitive   # flags go to the server
#   bash scripts/reward_ocr.sh --dry-run        # print the command instead of running it
#
# Environment: OCR_PORT (default 18082), OCR_HOST (default 0.0.0.0), PYTHON (interpreter to use; default:
# the active virtualenv/conda env, else the repo's .venv, else python3). Scoring options: OCR_ENGINE,
# OCR_CASE_SENSITIVE, OCR_IGNORE_PUNCT, OCR_USE_CONFUSION_FOLD, OCR_MIN_CONF, OCR_NGRAM_MAX
# (see `python -m deepgen_rl.rewards.servers.ocr --help`).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

dry_run=0
server_args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        *) server_args+=("$arg") ;;
    esac
done

# shellcheck source=utils/python_env.sh
source "$repo_root/scripts/utils/python_env.sh"
pick_python

port="${OCR_PORT:-18082}"
host="${OCR_HOST:-0.0.0.0}"
[[ "$port" =~ ^[1-9][0-9]*$ ]] || die "OCR_PORT must be a port number, got '$port'."

cmd=("$python_bin" -m deepgen_rl.rewards.servers.ocr --host "$host" --port "$port" "${server_args[@]}")
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

# Run from the checkout even when the package is not installed in this environment.
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
echo "[reward_ocr.sh] OCR server on $host:$port with $python_bin" >&2
exec "${cmd[@]}"
