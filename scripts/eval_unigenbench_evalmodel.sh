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
#   UNIGENBENCH_MODEL_PATH       local folder, or a model-hub name vLLM downloads (default CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1;
#                                UNIGENBENCH_MODEL, the reference's name for it, is read too)
#   UNIGENBENCH_MODEL_NAME       served model name clients ask for (default UniGenBench-EvalModel-qwen3vl-32b-v1,
#                                = --unigenbench_model_name of training, which reads the same variable)
#   UNIGENBENCH_PORT             port (default 8000; training reads UNIGENBENCH_API_URL, default http://localhost:8000)
#   UNIGENBENCH_HOST, VLLM_HOST  bind address (default 127.0.0.1; another one prints a warning, see below)
#   VLLM_PARALLEL_MODE           dp (one model replica per GPU, default) or tp (one model split over GPUs)
#   VLLM_DATA_PARALLEL_SIZE      replicas in dp mode (default: number of visible GPUs)
#   VLLM_TENSOR_PARALLEL_SIZE    GPUs per model in tp mode (default: number of visible GPUs)
#   VLLM_GPU_MEMORY_UTILIZATION  fraction of each GPU's memory vLLM may use (default 0.9)
#
# Same conventions as scripts/reward_unifiedreward.sh. Sleep mode is on so that a host that also serves the reward
# model can hold only one of them on the GPU: training with `--vllm_sleep_switching` keeps this judge asleep except
# during evaluation (without the flag nothing is switched). Its endpoints need VLLM_SERVER_DEV_MODE=1 (set here),
# whose unauthenticated dev endpoints are why the server binds 127.0.0.1 unless VLLM_HOST says otherwise. Prefix
# caching is on because every request repeats the same long instructions.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/utils/vllm_common.sh"
vllm_parse_args "$@"

model="${UNIGENBENCH_MODEL_PATH:-${UNIGENBENCH_MODEL:-CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1}}"
served_name="${UNIGENBENCH_MODEL_NAME:-UniGenBench-EvalModel-qwen3vl-32b-v1}"
port="${UNIGENBENCH_PORT:-8000}"
[ -n "$model" ] || die "UNIGENBENCH_MODEL_PATH is empty: set it to the judge's model name or local folder."
[ -n "$served_name" ] || die "UNIGENBENCH_MODEL_NAME is empty: set it to the name training asks for."
require_positive_int UNIGENBENCH_PORT "$port"

vllm_bind_host UNIGENBENCH_HOST
vllm_parallel_args
vllm_model_source UNIGENBENCH_MODEL_PATH "$model"

cmd=(vllm serve "$model"
     --host "$host" --port "$port"
     --served-model-name "$served_name"
     "${parallel_args[@]}"
     --gpu-memory-utilization "$gpu_util"
     --enable-sleep-mode
     --enable-prefix-caching
     "${extra_args[@]}")

vllm_run eval_unigenbench_evalmodel.sh "${cmd[@]}"
