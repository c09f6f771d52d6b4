#!/usr/bin/env bash
# Serve UnifiedReward-Think with vLLM (OpenAI-compatible API, no wrapper) for the `unifiedreward_think` reward.
#
#   bash scripts/reward_unifiedreward.sh                 # start the server (needs vLLM, e.g. conda activate deepgen_rl_reward)
#   bash scripts/reward_unifiedreward.sh --dry-run       # print the vLLM command instead of running it
#   VLLM_PARALLEL_MODE=tp bash scripts/reward_unifiedreward.sh -- --max-model-len 16384   # extra args go to vLLM
#
# Environment:
#   UNIFIEDREWARD_MODEL          local folder, or a model-hub name vLLM downloads (default
#                                CodeGoat24/UnifiedReward-Think-qwen3vl-8b: a download; the launcher says which)
#   UNIFIEDREWARD_PORT           port (default 18087)
#   UNIFIEDREWARD_HOST, VLLM_HOST  bind address (default 127.0.0.1; another one prints a warning: the dev-mode
#                                endpoints are then open to the network). Set VLLM_HOST=0.0.0.0 when training runs
#                                on other machines.
#   UNIFIEDREWARD_SERVED_NAME    name clients ask for (default UnifiedReward = --unifiedreward_model_name)
#   VLLM_PARALLEL_MODE           dp (one model replica per GPU, default) or tp (one model split over GPUs)
#   VLLM_DATA_PARALLEL_SIZE      replicas in dp mode (default: number of visible GPUs)
#   VLLM_TENSOR_PARALLEL_SIZE    GPUs per model in tp mode (default: number of visible GPUs)
#   VLLM_GPU_MEMORY_UTILIZATION  fraction of each GPU's memory vLLM may use (default 0.9)
#
# Sleep mode is on so that training can free the GPU of this model around evaluation when it shares GPUs with the
# UniGenBench judge: only `--vllm_sleep_switching` in training does that (/sleep, /wake_up, checked on /is_sleeping;
# vLLM exposes them only with VLLM_SERVER_DEV_MODE=1, which this script sets); without the flag nothing is switched.
# Prefix caching is on because every pairwise request repeats the same long template.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/utils/vllm_common.sh"
vllm_parse_args "$@"

model="${UNIFIEDREWARD_MODEL:-CodeGoat24/UnifiedReward-Think-qwen3vl-8b}"
port="${UNIFIEDREWARD_PORT:-18087}"
served_name="${UNIFIEDREWARD_SERVED_NAME:-UnifiedReward}"
require_positive_int UNIFIEDREWARD_PORT "$port"

vllm_bind_host UNIFIEDREWARD_HOST
vllm_parallel_args
vllm_model_source UNIFIEDREWARD_MODEL "$model"

cmd=(vllm serve "$model"
     --host "$host" --port "$port"
     --served-model-name "$served_name"
     "${parallel_args[@]}"
     --gpu-memory-utilization "$gpu_util"
     --limit-mm-per-prompt.image 16
     --enable-sleep-mode
     --enable-prefix-caching
     "${extra_args[@]}")

vllm_run reward_unifiedreward.sh "${cmd[@]}"
