#!/usr/bin/env bash
# Serve UnifiedReward-Think with vLLM (OpenAI-compatible API, no wrapper) for the `unifiedreward_think` reward.
#
#   bash scripts/reward_unifiedreward.sh                 # start the server (needs vLLM, e.g. conda activate deepgen_rl_reward)
#   bash scripts/reward_unifiedreward.sh --dry-run       # print the vLLM command instead of running it
#   VLLM_PARALLEL_MODE=tp bash scripts/reward_unifiedreward.sh -- --max-model-len 16384   # extra args go to vLLM
#
# Environment:
#   UNIFIEDREWARD_MODEL          model name or local folder (default CodeGoat24/UnifiedReward-Think-qwen3vl-8b)
#   UNIFIEDREWARD_PORT           port (default 18087); UNIFIEDREWARD_HOST bind address (default 0.0.0.0)
#   UNIFIEDREWARD_SERVED_NAME    name clients ask for (default UnifiedReward = --unifiedreward_model_name)
#   VLLM_PARALLEL_MODE           dp (one model replica per GPU, default) or tp (one model split over GPUs)
#   VLLM_DATA_PARALLEL_SIZE      replicas in dp mode (default: number of visible GPUs)
#   VLLM_TENSOR_PARALLEL_SIZE    GPUs per model in tp mode (default: number of visible GPUs)
#   VLLM_GPU_MEMORY_UTILIZATION  fraction of each GPU's memory vLLM may use (default 0.9)
#
# Sleep mode is on so training can free the GPU of this model around evaluation (vLLM exposes /sleep and
# /wake_up only with VLLM_SERVER_DEV_MODE=1, which this script sets); prefix caching is on because every
# pairwise request repeats the same long template.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

dry_run=0
extra_args=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        --) ;;
        *) extra_args+=("$arg") ;;
    esac
done

visible_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        local ids
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi > /dev/null 2>&1; then
        local n
        n="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
        echo "${n:-1}" | awk '{print ($1 > 0) ? $1 : 1}'
    else
        echo 1
    fi
}

require_positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'."
}

model="${UNIFIEDREWARD_MODEL:-CodeGoat24/UnifiedReward-Think-qwen3vl-8b}"
port="${UNIFIEDREWARD_PORT:-18087}"
host="${UNIFIEDREWARD_HOST:-0.0.0.0}"
served_name="${UNIFIEDREWARD_SERVED_NAME:-UnifiedReward}"
mode="${VLLM_PARALLEL_MODE:-dp}"
gpu_util="${VLLM_GPU_MEMORY_UTILIZATION:-0.9}"
require_positive_int UNIFIEDREWARD_PORT "$port"
[[ "$gpu_util" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || die "VLLM_GPU_MEMORY_UTILIZATION must be a fraction in (0, 1], got '$gpu_util'."

case "$mode" in
    dp)
        size="${VLLM_DATA_PARALLEL_SIZE:-$(visible_gpus)}"
        require_positive_int VLLM_DATA_PARALLEL_SIZE "$size"
        parallel_args=(--data-parallel-size "$size") ;;
    tp)
        size="${VLLM_TENSOR_PARALLEL_SIZE:-$(visible_gpus)}"
        require_positive_int VLLM_TENSOR_PARALLEL_SIZE "$size"
        parallel_args=(--tensor-parallel-size "$size") ;;
    *)
        die "VLLM_PARALLEL_MODE must be 'dp' (data parallel: one replica per GPU) or 'tp' (tensor parallel), got '$mode'." ;;
esac

cmd=(vllm serve "$model"
     --host "$host" --port "$port"
     --served-model-name "$served_name"
     "${parallel_args[@]}"
     --gpu-memory-utilization "$gpu_util"
     --limit-mm-per-prompt.image 16
     --enable-sleep-mode
     --enable-prefix-caching
     "${extra_args[@]}")

if [ "$dry_run" = 1 ]; then
    printf 'VLLM_SERVER_DEV_MODE=1'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi

command -v vllm > /dev/null 2>&1 || die "vllm is not on PATH: activate the environment that has vLLM (e.g. conda activate deepgen_rl_reward)."
# vLLM lives in its own environment: do not let the training environment's paths leak into it.
unset PYTHONPATH PYTHONHOME PYTORCH_CUDA_ALLOC_CONF
export PYTHONNOUSERSITE=1 VLLM_SERVER_DEV_MODE=1
echo "[reward_unifiedreward.sh] serving $model as '$served_name' on $host:$port ($mode, size $size)" >&2
exec "${cmd[@]}"
