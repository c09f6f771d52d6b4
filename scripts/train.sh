#!/usr/bin/env bash
# DeepGen-RL GRPO training (docs/training_guide.md#launch-flow).
#
#   bash scripts/train.sh                         # one node, all its GPUs
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29700 NGPUS=8 bash scripts/train.sh
#   bash scripts/train.sh --learning_rate 1e-6    # any extra flag is passed to deepgen_rl/grpo_deepgen.py
#
# Python: $PYTHON when set; else the activated environment (conda or venv) when its `python` has the training
# dependencies; else the repo's .venv (scripts/setup_venv.sh); else it stops and says how to get one.
# Multi-node (NNODES > 1) needs MASTER_ADDR = node 0's address as the other nodes reach it (never a loopback
# one); a node waits RDZV_TIMEOUT seconds (default 600) for the others, then stops with what to check.
# Model paths come from SD3_5_MODEL_NAME_OR_PATH, QWEN2_5_VL_MODEL_NAME_OR_PATH, CLIP_MODEL_NAME_OR_PATH and
# CHECKPOINT; reward/judge servers from OCR_URL, UNIFIEDREWARD_THINK_URL, UNIGENBENCH_API_URL (default
# http://localhost:<port>). Before launching, every path and every server the dataset YAML needs is checked
# (deepgen_rl/preflight/) so a typo fails here, in seconds, not after eight processes loaded a 3B model; the
# servers are then awaited together for up to --server_wait seconds (default 900: a 32B vLLM judge loading).
# GPUs per node: NGPUS, else as many as CUDA_VISIBLE_DEVICES lists, else `nvidia-smi -L`; printed at start.
# Run length: printed at start (prompts / prompts per step x --num_train_epochs -> GRPO steps, and the first
# checkpoint); `--max_steps N` sets it directly, `--save_steps` (default 10) how often it checkpoints, and
# `--save_total_limit` (3 here) how many checkpoints stay (each holds weights and optimizer states: ~35 GB for the
# full DiT under ZeRO-2).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

# shellcheck source=utils/gpus.sh
source "$repo_root/scripts/utils/gpus.sh"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
NGPUS="${NGPUS:-}"  # counted below, after --help
OUTPUT_DIR="${OUTPUT_DIR:-outputs/deepgen_grpo}"
DATASET_CONFIG="${DATASET_CONFIG:-assets/rl_datasets/deepgen/deepgen_train.yaml}"
EVAL_DATASET_CONFIG="${EVAL_DATASET_CONFIG:-assets/rl_datasets/deepgen/eval/eval.yaml}"
SFTAUX_DATASET_CONFIG="${SFTAUX_DATASET_CONFIG:-deepgen_rl/sft/configs/datasets/deepgen/t2i_grpo_moretextdata.py}"
DEEPSPEED_CONFIG="${DEEPSPEED_CONFIG:-scripts/deepspeed/zero2.json}"
RDZV_TIMEOUT="${RDZV_TIMEOUT:-600}"
# Seconds torchrun waits after forwarding SIGTERM before it SIGKILLs the workers (torch's default: 30). The trainer
# checkpoints at the next safe point inside the step; a longer grace covers a slow rollout or reward call. Keep the
# scheduler's own grace (Slurm KillWait / --signal, Kubernetes terminationGracePeriodSeconds) longer still.
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}}"

# Experiment tracking is offline unless you say otherwise (docs/training_guide.md#logging).
export WANDB_MODE="${WANDB_MODE:-offline}"
export WANDB_PROJECT="${WANDB_PROJECT:-DeepGen-RL}"
export SWANLAB_MODE="${SWANLAB_MODE:-offline}"
export SWANLAB_PROJ_NAME="${SWANLAB_PROJ_NAME:-DeepGen-RL}"

for name in NNODES NODE_RANK MASTER_PORT RDZV_TIMEOUT SHUTDOWN_TIMEOUT; do
    value="${!name}"
    if ! [[ "$value" =~ ^[0-9]+$ ]]; then
        echo "error: $name must be a non-negative integer, got '$value'" >&2
        exit 2
    fi
done
if [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "error: NODE_RANK ($NODE_RANK) must be smaller than NNODES ($NNODES)" >&2
    exit 2
fi
if [ "$NNODES" -gt 1 ]; then
    # A loopback MASTER_ADDR makes every node wait for a rendezvous on itself, forever as far as the user sees.
    case "$MASTER_ADDR" in
        "")
            echo "error: NNODES=$NNODES but MASTER_ADDR is not set: export MASTER_ADDR=<node 0's IP address, as" \
                 "the other nodes reach it> (e.g. MASTER_ADDR=10.0.0.1) on every node." >&2
            exit 2 ;;
        localhost|localhost.*|127.*|::1|"[::1]"|0.0.0.0)
            echo "error: NNODES=$NNODES but MASTER_ADDR=$MASTER_ADDR is a loopback address: every node would wait" \
                 "for itself. Export MASTER_ADDR=<node 0's IP address, as the other nodes reach it> on every node." >&2
            exit 2 ;;
    esac
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"

# The interpreter, picked as scripts/quickstart.sh does (without creating a venv on a training node).
# find_spec, not import: a missing package is found in milliseconds, without loading torch.
missing_deps() {
    "$1" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "transformers", "diffusers", "deepspeed") if u.find_spec(m) is None))' \
        2>/dev/null || echo "(cannot run $1)"
}
if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1 && [ -z "$(missing_deps python)" ]; then
        PYTHON=python                         # the activated conda env / venv
    elif [ -x "$repo_root/.venv/bin/python" ]; then
        PYTHON="$repo_root/.venv/bin/python"  # the repo's venv (scripts/setup_venv.sh)
    else
        echo "error: no Python environment with the training dependencies: the 'python' on PATH lacks them" \
             "and $repo_root/.venv does not exist. Run bash scripts/setup_venv.sh (creates .venv), or conda" \
             "activate deepgen_rl (environment.yml), or set PYTHON=/path/to/python of such an environment." >&2
        exit 2
    fi
fi
missing="$(missing_deps "$PYTHON")"
if [ -n "$missing" ]; then
    echo "error: PYTHON=$PYTHON lacks the training dependencies (missing: $missing). Run bash" \
         "scripts/setup_venv.sh and use .venv/bin/python, activate the conda env of environment.yml, or set" \
         "PYTHON to an environment where deepgen_rl's dependencies are installed." >&2
    exit 2
fi

# --help: the trainer's flags once (not once per torchrun worker), after what this script reads.
for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
        echo
        exec "$PYTHON" -m deepgen_rl.grpo_deepgen --help
    fi
done

if [ -z "$NGPUS" ]; then
    count_gpus
    if [ "$gpu_count" -lt 1 ]; then
        echo "error: cannot count this node's GPUs: $gpu_source. Set NGPUS=<processes per node> (or" \
             "CUDA_VISIBLE_DEVICES=0,1,...)." >&2
        exit 2
    fi
    NGPUS="$gpu_count"
    gpus_from="$gpu_source"
else
    if ! [[ "$NGPUS" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: NGPUS must be a positive integer, got '$NGPUS'" >&2
        exit 2
    fi
    gpus_from="NGPUS=$NGPUS"
fi

args=(
    --output_dir "$OUTPUT_DIR"
    --dataset_config "$DATASET_CONFIG"
    --eval_dataset_config "$EVAL_DATASET_CONFIG"
    --sftaux_dataset_config "$SFTAUX_DATASET_CONFIG"
    --num_train_epochs 10
    --lr_scheduler_type constant_with_warmup
    --deepspeed "$DEEPSPEED_CONFIG"
    --report_to wandb,swanlab
    --save_total_limit 3
    "$@"
)

world_size=$((NNODES * NGPUS))
echo "[train.sh] GPUs taken: $NGPUS per node ($gpus_from) x NNODES $NNODES = world size $world_size;" \
     "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<not set: all>}"
"$PYTHON" -m deepgen_rl.preflight --world_size "$world_size" "${args[@]}"

# deepgen_rl.launch is torchrun run in-process (same agent, same signals) whose failed rendezvous ends in a message.
exec "$PYTHON" -m deepgen_rl.launch \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --rdzv-conf "timeout=$RDZV_TIMEOUT" \
    --nproc_per_node "$NGPUS" \
    --shutdown_timeout "$SHUTDOWN_TIMEOUT" \
    -m deepgen_rl.grpo_deepgen "${args[@]}"
