# Shared by scripts/reward_unifiedreward.sh and scripts/eval_unigenbench_evalmodel.sh (sourced, not run):
# argument parsing, the dp/tp parallel flags, validation, and the dry-run / exec of a `vllm serve` command.
#
# After `source`, call:   vllm_parse_args "$@"     -> sets dry_run (0/1) and extra_args (passed to vLLM)
#                          vllm_parallel_args       -> sets parallel_args, parallel_size from VLLM_PARALLEL_MODE
#                          vllm_bind_host VAR       -> sets host: $VAR, else $VLLM_HOST, else 127.0.0.1
#                          vllm_model_source VAR M  -> says whether model M ($VAR) is a local folder or a download
#                          vllm_run NAME cmd...     -> prints the command (--dry-run) or execs it
#
# Written for vLLM 0.11 (0.11.0 or newer: the first release serving Qwen3-VL, the architecture of both default
# models; --data-parallel-size, --limit-mm-per-prompt.image, --enable-sleep-mode and the dev-mode /sleep, /wake_up
# and /is_sleeping endpoints are used).

die() { echo "error: $*" >&2; exit 2; }

require_positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'."
}

vllm_parse_args() {
    dry_run=0
    extra_args=()
    local arg
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry_run=1 ;;
            --) ;;
            *) extra_args+=("$arg") ;;
        esac
    done
}

# shellcheck source=gpus.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"

visible_gpus() {  # the default dp / tp size: the GPUs CUDA will show vLLM (at least 1)
    count_gpus
    echo $((gpu_count > 0 ? gpu_count : 1))
}

vllm_parallel_args() {
    local mode="${VLLM_PARALLEL_MODE:-dp}"
    gpu_util="${VLLM_GPU_MEMORY_UTILIZATION:-0.9}"
    [[ "$gpu_util" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] \
        || die "VLLM_GPU_MEMORY_UTILIZATION must be a fraction in (0, 1], got '$gpu_util'."
    case "$mode" in
        dp)
            parallel_size="${VLLM_DATA_PARALLEL_SIZE:-$(visible_gpus)}"
            require_positive_int VLLM_DATA_PARALLEL_SIZE "$parallel_size"
            parallel_args=(--data-parallel-size "$parallel_size") ;;
        tp)
            parallel_size="${VLLM_TENSOR_PARALLEL_SIZE:-$(visible_gpus)}"
            require_positive_int VLLM_TENSOR_PARALLEL_SIZE "$parallel_size"
            parallel_args=(--tensor-parallel-size "$parallel_size") ;;
        *)
            die "VLLM_PARALLEL_MODE must be 'dp' (data parallel: one replica per GPU) or 'tp' (tensor parallel), got '$mode'." ;;
    esac
    parallel_mode="$mode"
    count_gpus
    echo "[$(basename "$0")] GPUs taken: $gpu_source; $mode size $parallel_size; each GPU's memory fraction" \
         "$gpu_util (VLLM_GPU_MEMORY_UTILIZATION)" >&2
}

# Sleep mode needs vLLM's dev mode, whose endpoints (/sleep, /wake_up, /reset_prefix_cache, ...) have no
# authentication: bind to the loopback interface unless told otherwise, and say so loudly when told otherwise.
vllm_bind_host() {  # VAR: the script's own host variable (read before VLLM_HOST)
    host="${!1:-${VLLM_HOST:-127.0.0.1}}"
    case "$host" in
        127.0.0.1|localhost|::1) ;;
        *) echo "warning: binding ${host} (${1} / VLLM_HOST): vLLM runs in dev mode (VLLM_SERVER_DEV_MODE=1, for" \
                "sleep mode), so /sleep, /wake_up, /reset_prefix_cache and its other dev endpoints are open to every" \
                "host that reaches this port; use a trusted network or firewall the port." >&2 ;;
    esac
}

vllm_model_source() {  # VAR MODEL: a local folder is served as is; anything else is a model-hub name to download
    if [ -d "$2" ]; then
        echo "[$(basename "$0")] model: local folder $2 ($1)" >&2
    else
        echo "[$(basename "$0")] model: $2 is not a local folder, so vLLM will DOWNLOAD it from the model hub into" \
             "its cache (needs network access and disk space; a 32B model is ~65 GB). Set $1=/path/to/local/folder" \
             "to serve a copy you already have." >&2
    fi
}

vllm_run() {  # NAME cmd...
    local name="$1"
    shift
    echo "[$name] sleep mode is enabled but nothing switches it unless training runs with --vllm_sleep_switching" \
         "(then the trainer puts the reward model to sleep and wakes the judge around each evaluation)." >&2
    if [ "$dry_run" = 1 ]; then
        printf 'VLLM_SERVER_DEV_MODE=1'
        printf ' %q' "$@"
        printf '\n'
        exit 0
    fi
    command -v vllm > /dev/null 2>&1 \
        || die "vllm is not on PATH: activate the environment that has vLLM (it is not a training dependency)."
    # vLLM lives in its own environment: do not let the training environment's paths leak into it.
    unset PYTHONPATH PYTHONHOME PYTORCH_CUDA_ALLOC_CONF
    # Sleep mode's /sleep and /wake_up endpoints exist only in vLLM's dev mode.
    export PYTHONNOUSERSITE=1 VLLM_SERVER_DEV_MODE=1
    echo "[$name] serving on ${host}:${port} ($parallel_mode, size $parallel_size): $*" >&2
    exec "$@"
}
