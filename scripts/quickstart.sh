#!/usr/bin/env bash
# CPU quick start: GRPO on a tiny, randomly initialised DeepGen model, no GPU, no weights, no external servers.
#
#   bash scripts/quickstart.sh                     # a few minutes on a laptop CPU
#   QUICKSTART_STEPS=10 bash scripts/quickstart.sh # shorter
#   QUICKSTART_OCR=0 bash scripts/quickstart.sh    # without the local OCR server
#
# It goes through the real run's code: tiny models are written in the real on-disk layouts and loaded from
# SD3_5_MODEL_NAME_OR_PATH / QWEN2_5_VL_MODEL_NAME_OR_PATH / CHECKPOINT, training is `scripts/train.sh`
# (preflight + torchrun + deepgen_rl/grpo_deepgen.py + DeepSpeed ZeRO-2 on CPU), and the last checkpoint is
# converted with scripts/utils/rlckpt_to_sftckpt.py. Output, under $QUICKSTART_DIR (default outputs/quickstart):
#   run/jpeg_reward_curve.png   mean JPEG-compressibility reward per step (the curve that shows the learning)
#   run/reward_curve.png        mean weighted reward per step (mixes the datasets' rewards)
#   run/samples/step_*.png      rollout image grids (one row per prompt, one column per group member)
#   run/metrics.jsonl           every logged metric of every step
#   deepgen_rl_quickstart.pth   the trained weights in the SFT .pth format
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [ -z "${PYTHON:-}" ]; then
    if [ -n "${CONDA_PREFIX:-}" ] && python -c "import deepgen_rl" 2>/dev/null; then
        PYTHON=python  # the activated conda env of environment.yml
    else
        bash scripts/setup_venv.sh  # creates .venv on first use, a no-op afterwards
        PYTHON=.venv/bin/python
    fi
fi
out="${QUICKSTART_DIR:-outputs/quickstart}"
steps="${QUICKSTART_STEPS:-40}"
use_ocr="${QUICKSTART_OCR:-1}"
[[ "$steps" =~ ^[1-9][0-9]*$ ]] || { echo "error: QUICKSTART_STEPS must be a positive integer, got '$steps'" >&2; exit 2; }

"$PYTHON" -c "import deepgen_rl" 2>/dev/null || {
    echo "error: $PYTHON cannot import deepgen_rl: run bash scripts/setup_venv.sh, or activate the conda env of" \
         "environment.yml, or set PYTHON=/path/to/python of an environment where deepgen_rl is installed." >&2
    exit 2
}

rm -rf "$out/run"
mkdir -p "$out"
echo "[quickstart 1/4] writing tiny models to $out/tiny_models"
"$PYTHON" -m deepgen_rl.model.tiny --output_dir "$out/tiny_models" > "$out/tiny_models.log"
grep "^export " "$out/tiny_models.log" > "$out/tiny_models/env.sh"
# shellcheck disable=SC1091
source "$out/tiny_models/env.sh"
read -r -a model_flags <<< "$("$PYTHON" -c 'from deepgen_rl.model.tiny import TinyModelPaths; print(*TinyModelPaths.model_flags())')"

dataset=assets/rl_datasets/quickstart/quickstart.yaml
ocr_pid=""
cleanup() { [ -n "$ocr_pid" ] && kill "$ocr_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ "$use_ocr" != 0 ] && "$PYTHON" -c "import rapidocr_onnxruntime" 2>/dev/null; then
    ocr_port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    echo "[quickstart 2/4] starting the OCR reward server on 127.0.0.1:$ocr_port (log: $out/ocr_server.log)"
    OCR_HOST=127.0.0.1 OCR_PORT="$ocr_port" PYTHON="$PYTHON" bash scripts/reward_ocr.sh > "$out/ocr_server.log" 2>&1 &
    ocr_pid=$!
    export OCR_URL="http://127.0.0.1:$ocr_port"
    dataset=assets/rl_datasets/quickstart/quickstart_ocr.yaml
else
    echo "[quickstart 2/4] no OCR server (QUICKSTART_OCR=0 or RapidOCR missing): local jpeg_compressibility reward only"
fi

echo "[quickstart 3/4] GRPO for $steps steps on CPU through scripts/train.sh"
NGPUS=1 NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 \
MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHON="$PYTHON" \
OUTPUT_DIR="$out/run" DATASET_CONFIG="$dataset" \
    bash scripts/train.sh "${model_flags[@]}" \
        --image_height 64 --image_width 64 --num_inference_steps 4 --timestep_fraction 1.0 \
        --rollout_n 8 --global_batch_size 32 --rollout_micro_batch_size 32 --atrain_micro_batch_size 32 \
        --learning_rate "${QUICKSTART_LR:-2e-3}" --lr_scheduler_type constant --max_steps "$steps" \
        --eval_freq 0 --sample_image_freq "$(( steps / 4 > 0 ? steps / 4 : 1 ))" --save_steps "$steps" \
        --reward_health_timeout 60 --report_to none --seed 0

# reward/mean mixes datasets whose rewards differ (the text prompts also carry the ~0 OCR score), so it jumps
# with each step's prompt draw; the JPEG reward alone, computed on every sample, shows the learning.
"$PYTHON" -c 'import sys; from pathlib import Path; from deepgen_rl.trainer.logging_utils import plot_metric_curve
run = Path(sys.argv[1]); plot_metric_curve(run / "metrics.jsonl", sys.argv[2], run / "jpeg_reward_curve.png")' \
    "$out/run" reward/jpeg_compressibility/mean \
    || echo "warning: could not plot $out/run/jpeg_reward_curve.png (the metrics are in metrics.jsonl)" >&2

echo "[quickstart 4/4] converting checkpoint-$steps to the SFT .pth format"
"$PYTHON" scripts/utils/rlckpt_to_sftckpt.py --rl_checkpoint "$out/run/checkpoint-$steps" \
    --output "$out/deepgen_rl_quickstart.pth"

echo
echo "Done. Look at:"
echo "  $out/run/jpeg_reward_curve.png   JPEG-compressibility reward per step: it rises as GRPO learns"
echo "  $out/run/reward_curve.png        reward/mean (mixes the datasets' rewards, so it is noisier)"
ls "$out"/run/samples/*.png | sed 's/^/  /'
echo "  $out/deepgen_rl_quickstart.pth"
