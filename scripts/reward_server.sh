#!/usr/bin/env bash
# Start one of our reward servers by its reward name (the name the dataset YAML uses):
#
#   bash scripts/reward_server.sh pickscore       # PickScore,  :18091 (PICKSCORE_PORT)   needs PICKSCORE_MODEL_PATH
#   bash scripts/reward_server.sh hpsv2           # HPSv2.1,    :18092 (HPSV2_PORT)       needs HPSV2_CHECKPOINT, HPSV2_PROCESSOR_PATH
#   bash scripts/reward_server.sh image_reward    # ImageReward,:18093 (IMAGE_REWARD_PORT) needs IMAGEREWARD_CHECKPOINT, IMAGEREWARD_TOKENIZER_PATH
#   bash scripts/reward_server.sh aesthetic       # aesthetic,  :18094 (AESTHETIC_PORT)   needs AESTHETIC_MLP_PATH (+ CLIP path)
#   bash scripts/reward_server.sh ocr             # the OCR server: runs scripts/reward_ocr.sh (OCR_PORT, :18082)
#   CUDA_VISIBLE_DEVICES=3 bash scripts/reward_server.sh hpsv2 --batch-size 32   # GPU 3; flags go to the server
#   bash scripts/reward_server.sh pickscore --dry-run                            # print the command only
#
# Training reaches it at <NAME>_URL (default http://localhost:<port>). Environment: <NAME>_PORT,
# REWARD_SERVER_HOST (default 0.0.0.0), PYTHON (interpreter; default: the active env, else the repo's .venv).
# Model paths: `python -m deepgen_rl.rewards.servers.serve --help`. Each server can live in its own environment
# (they need nothing beyond the training package: transformers, torch, FastAPI).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
names="pickscore hpsv2 image_reward aesthetic ocr"
usage() {  # this file's header comment
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}
[ $# -ge 1 ] || die "usage: bash scripts/reward_server.sh NAME [--dry-run] [server flags]; NAME is one of: $names."
name="$1"
shift
if [ "$name" = "-h" ] || [ "$name" = "--help" ]; then
    usage
    exit 0
fi
case "$name" in
    pickscore) default_port=18091 ;;
    hpsv2) default_port=18092 ;;
    image_reward) default_port=18093 ;;
    aesthetic) default_port=18094 ;;
    ocr) exec bash "$repo_root/scripts/reward_ocr.sh" "$@" ;;
    *) die "unknown reward server '$name'; choose one of: $names." ;;
esac

dry_run=0
help=0
server_args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) help=1 ;;
        *) server_args+=("$arg") ;;
    esac
done

port_var="$(echo "$name" | tr '[:lower:]' '[:upper:]')_PORT"
port="${!port_var:-$default_port}"
host="${REWARD_SERVER_HOST:-0.0.0.0}"
[[ "$port" =~ ^[1-9][0-9]*$ ]] || die "$port_var must be a port number, got '$port'."

# shellcheck source=utils/python_env.sh
source "$repo_root/scripts/utils/python_env.sh"
pick_python

if [ "$help" = 1 ]; then  # this launcher's variables, then the server's own flags
    usage
    echo
    PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}" exec "$python_bin" -m deepgen_rl.rewards.servers.serve --help
fi

cmd=("$python_bin" -m deepgen_rl.rewards.servers.serve "$name" --host "$host" --port "$port" "${server_args[@]}")
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck source=utils/gpus.sh
source "$repo_root/scripts/utils/gpus.sh"
count_gpus
echo "[reward_server.sh] $name server on $host:$port with $python_bin; GPU taken: the first of $gpu_source" \
     "($gpu_count visible)" >&2
exec "${cmd[@]}"
