#!/usr/bin/env bash
# Serve the UniGenBench judge (UniGenBench-EvalModel) with vLLM, OpenAI-compatible API on port 8000, for the
# periodic evaluation of training and for `python -m deepgen_rl.eval`.
#
#   bash scripts/eval_unigenbench_evalmodel.sh               # start the server (needs vLLM in this environment)
#   bash scripts/eval_unigenbench_evalmodel.sh --dry-run     # print the vLLM command instead of running it
#   VLLM_PARALLEL_MODE=tp VLLM_TENSOR_PARALLEL_SIZE=4 bash scripts/eval_unigenbench_evalmodel.sh -- --max-model-len 32768
#                                                            # extra args after -- go to vLLM
#
# Environment:
#   UNIGENBENCH_MODEL_PATH       model name or local folder (default CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1;
#                                UNIGENBENCH_MODEL, the reference's name for it, is read too)
#   UNIGENBENCH_MODEL_NAME       served model name clients ask for (default UniGenBench-EvalModel-qwen3vl-32b-v1,
#                                = --unigenbench_model_name of training, which reads the same variable)
#   UNIGENBENCH_PORT             port (default 8000; training reads UNIGENBENCH_API_URL, default http://localhost:8000)
#   UNIGENBENCH_HOST             bind address (default 0.0.0.0)
#   VLLM_PARALLEL_MODE           dp (one model replica per GPU, default) or tp (one model split over GPUs)
#   VLLM_DATA_PARALLEL_SIZE      replicas in dp mode (default: number of visible GPUs)
#   VLLM_TENSOR_PARALLEL_SIZE    GPUs per model in tp mode (default: number of visible GPUs)
#   VLLM_GPU_MEMORY_UTILIZATION  fraction of each GPU's memory vLLM may use (default 0.9)
#
# Same conventions as scripts/reward_unifiedreward.sh. Sleep mode is on so a host that also serves the reward model
# can free this one's GPU memory between evaluations (vLLM exposes /sleep and /wake_up only with
# VLLM_SERVER_DEV_MODE=1, set here); prefix caching is on because every request repeats the same long instructions.
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

model="${UNIGENBENCH_MODEL_PATH:-${UNIGENBENCH_MODEL:-CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1}}"
served_name="${UNIGENBENCH_MODEL_NAME:-UniGenBench-EvalModel-qwen3vl-32b-v1}"
port="${UNIGENBENCH_PORT:-8000}"
host="${UNIGENBENCH_HOST:-0.0.0.0}"
mode="${VLLM_PARALLEL_MODE:-dp}"
gpu_util="${VLLM_GPU_MEMORY_UTILIZATION:-0.9}"
[ -n "$model" ] || die "UNIGENBENCH_MODEL_PATH is empty: set it to the judge's model name or local folder."
[ -n "$served_name" ] || die "UNIGENBENCH_MODEL_NAME is empty: set it to the name training asks for."
require_positive_int UNIGENBENCH_PORT "$port"
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
     --enable-sleep-mode
     --enable-prefix-caching
     "${extra_args[@]}")

if [ "$dry_run" = 1 ]; then
    printf 'VLLM_SERVER_DEV_MODE=1'
    printf ' %q' "${cmd[@]}"
    printf '\n'
    exit 0
fi

command -v vllm > /dev/null 2>&1 || die "vllm is not on PATH: activate the environment that has vLLM (it is not a training dependency)."
# vLLM lives in its own environment: do not let the training environment's paths leak into it.
unset PYTHONPATH PYTHONHOME PYTORCH_CUDA_ALLOC_CONF
export PYTHONNOUSERSITE=1 VLLM_SERVER_DEV_MODE=1
echo "[eval_unigenbench_evalmodel.sh] serving $model as '$served_name' on $host:$port ($mode, size $size)" >&2
exec "${cmd[@]}"
