#!/usr/bin/env bash
# CPU quick start: GRPO on a tiny DeepGen model pretrained in-repo on a synthetic prompt -> image task
# ("a red circle on the left, a blue square on the right"), no GPU, no downloaded weights, no external servers.
#
#   bash scripts/quickstart.sh                     # a few minutes on a laptop CPU
#   QUICKSTART_STEPS=10 bash scripts/quickstart.sh # shorter
#   QUICKSTART_OCR=0 bash scripts/quickstart.sh    # without the local OCR server
#   QUICKSTART_PRETRAIN=1 bash scripts/quickstart.sh  # pretrain the tiny model again instead of the shipped one
#   QUICKSTART_PRETRAIN_STEPS / QUICKSTART_PRETRAIN_VAE_STEPS  # pretraining length (default: PretrainSettings'
#                                                              # in deepgen_rl/model/tiny_pretrain.py)
#
# It goes through the real run's code: the tiny model pretrained with the SFT-aux flow-matching loss ships in
# assets/tiny_pretrained (made by python -m deepgen_rl.model.tiny --pretrain_steps N with PretrainSettings'
# defaults; its pretrain.json holds the recipe and loss curve). QUICKSTART_PRETRAIN=1, or other pretraining
# settings, pretrain it again into $QUICKSTART_DIR/tiny_pretrained (cached there, so later runs skip it). The
# model is written in the real on-disk layouts and loaded from SD3_5_MODEL_NAME_OR_PATH /
# QWEN2_5_VL_MODEL_NAME_OR_PATH / CHECKPOINT; training is `scripts/train.sh` (preflight + torchrun +
# deepgen_rl/grpo_deepgen.py + DeepSpeed ZeRO-2 on CPU) with the exact local reward synthetic_match, and the last
# checkpoint is converted with scripts/utils/rlckpt_to_sftckpt.py. Output, under $QUICKSTART_DIR (default
# outputs/quickstart):
#   before.png / after.png          the same prompts and noise before and after GRPO (one row per prompt, the
#                                   prompt and the row's reward under it)
#   run/synthetic_reward_curve.png  mean synthetic_match reward per step (the curve that shows the learning)
#   run/reward_curve.png            mean weighted reward per step (mixes the datasets' rewards)
#   run/samples/step_*.png          rollout image grids of training steps (captions in step_*.txt)
#   run/metrics.jsonl               every logged metric of every step
#   deepgen_rl_quickstart.pth       the trained weights in the SFT .pth format
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

defaults="$("$PYTHON" -c 'from deepgen_rl.model.tiny_pretrain import PretrainSettings as S; print(S.steps, S.vae_steps)')"
read -r default_steps default_vae_steps <<< "$defaults"
pretrain_steps="${QUICKSTART_PRETRAIN_STEPS:-$default_steps}"
pretrain_vae_steps="${QUICKSTART_PRETRAIN_VAE_STEPS:-$default_vae_steps}"
lr="${QUICKSTART_LR:-5e-5}"
pretrain="${QUICKSTART_PRETRAIN:-0}"
[[ "$pretrain" =~ ^[01]$ ]] || { echo "error: QUICKSTART_PRETRAIN must be 0 or 1, got '$pretrain'" >&2; exit 2; }
# Every setting is checked before anything of an earlier run is replaced.
for name in pretrain_steps pretrain_vae_steps; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || {
        echo "error: QUICKSTART_${name^^} must be a non-negative integer, got '${!name}'" >&2; exit 2; }
done
"$PYTHON" -c 'import sys; assert float(sys.argv[1]) >= 0' "$lr" 2>/dev/null || {
    echo "error: QUICKSTART_LR must be a non-negative number (e.g. 5e-5), got '$lr'" >&2; exit 2; }

rm -rf "$out/run" "$out/before.png" "$out/after.png"
mkdir -p "$out"
# The shipped model, unless asked to pretrain again or with other settings (then cached under $out).
model_dir="$out/tiny_pretrained"
if [ "$pretrain" = 0 ] && [ "$pretrain_steps" = "$default_steps" ] \
        && [ "$pretrain_vae_steps" = "$default_vae_steps" ]; then
    model_dir=assets/tiny_pretrained
    # Checked first: the CLI would pretrain into a folder whose record does not match, i.e. over the shipped files.
    "$PYTHON" -c 'import sys; from pathlib import Path
from deepgen_rl.model.tiny_pretrain import PretrainSettings, cached_record
sys.exit(cached_record(Path(sys.argv[1]), PretrainSettings(), seed=0) is None)' "$model_dir" || {
        echo "error: the shipped $model_dir/pretrain.json does not match PretrainSettings' defaults; restore it" \
             "with git, or run with QUICKSTART_PRETRAIN=1 to pretrain into $out/tiny_pretrained" >&2; exit 1; }
fi
echo "[quickstart 1/5] tiny model pretrained on the synthetic task ($pretrain_steps steps) in $model_dir"
start=$SECONDS
"$PYTHON" -m deepgen_rl.model.tiny --output_dir "$model_dir" --pretrain_steps "$pretrain_steps" \
    --pretrain_vae_steps "$pretrain_vae_steps" \
    > "$out/tiny_models.log" 2> "$out/pretrain.log" \
    || { echo "error: pretraining failed, see $out/pretrain.log" >&2; tail -20 "$out/pretrain.log" >&2; exit 1; }
if [ "$model_dir" = assets/tiny_pretrained ]; then
    echo "  the shipped model (its recipe and loss curve: $model_dir/pretrain.json; QUICKSTART_PRETRAIN=1 remakes it)"
elif grep -q "reusing the pretrained tiny model" "$out/pretrain.log"; then
    echo "  reused: it was pretrained with these settings by an earlier run (delete the folder to pretrain again)"
else
    echo "  pretrained in $(( SECONDS - start )) s (log: $out/pretrain.log); later runs reuse it"
fi
grep "^export " "$out/tiny_models.log" > "$out/tiny_model_env.sh"
# shellcheck disable=SC1091
source "$out/tiny_model_env.sh"
read -r -a model_flags <<< "$("$PYTHON" -c 'from deepgen_rl.model.tiny import TinyModelPaths; print(*TinyModelPaths.model_flags())')"

dataset=assets/rl_datasets/synthetic/synthetic.yaml
ocr_pid=""
cleanup() { [ -n "$ocr_pid" ] && kill "$ocr_pid" 2>/dev/null || true; }
trap cleanup EXIT
if [ "$use_ocr" != 0 ] && "$PYTHON" -c "import rapidocr_onnxruntime" 2>/dev/null; then
    ocr_port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    echo "[quickstart 2/5] starting the OCR reward server on 127.0.0.1:$ocr_port (log: $out/ocr_server.log)"
    OCR_HOST=127.0.0.1 OCR_PORT="$ocr_port" PYTHON="$PYTHON" bash scripts/reward_ocr.sh > "$out/ocr_server.log" 2>&1 &
    ocr_pid=$!
    export OCR_URL="http://127.0.0.1:$ocr_port"
    dataset=assets/rl_datasets/synthetic/synthetic_ocr.yaml
else
    echo "[quickstart 2/5] no OCR server (QUICKSTART_OCR=0 or RapidOCR missing): local synthetic_match reward only"
fi

report() {  # $1: output PNG, $2: title, $3...: extra flags
    local png="$1" title="$2"; shift 2
    "$PYTHON" -m deepgen_rl.eval.synthetic_report --output "$png" --title "$title" "$@" > "$png.json" \
        2> "$png.log" || { echo "error: sampling $png failed, see $png.log" >&2; tail -20 "$png.log" >&2; exit 1; }
    tail -1 "$png.json"
}
echo "[quickstart 3/5] samples before GRPO -> $out/before.png"
before="$(report "$out/before.png" "before GRPO (pretrained tiny model)")"
echo "  $before"

echo "[quickstart 4/5] GRPO for $steps steps on CPU through scripts/train.sh"
NGPUS=1 NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 \
MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHON="$PYTHON" \
OUTPUT_DIR="$out/run" DATASET_CONFIG="$dataset" \
    bash scripts/train.sh "${model_flags[@]}" \
        --image_height 64 --image_width 64 --num_inference_steps 4 --timestep_fraction 1.0 \
        --rollout_n 8 --global_batch_size 32 --rollout_micro_batch_size 32 --atrain_micro_batch_size 32 \
        --sftaux_global_batch_size 4 \
        --learning_rate "$lr" --clip_range 1e-2 --lr_scheduler_type constant --max_steps "$steps" \
        --eval_freq 0 --sample_image_freq "$(( steps / 4 > 0 ? steps / 4 : 1 ))" --save_steps "$steps" \
        --reward_health_timeout 60 --report_to none --seed 0

# reward/mean mixes datasets whose rewards differ (the OCR prompts score ~0); synthetic_match alone shows the
# learning. It still jumps with each step's draw of 4 prompts (some are easier than others): the curve's line is
# a 5-step trailing mean. before.png / after.png compare the same prompts and noise.
"$PYTHON" -c 'import sys; from pathlib import Path; from deepgen_rl.trainer.logging_utils import plot_metric_curve
run = Path(sys.argv[1]); plot_metric_curve(run / "metrics.jsonl", sys.argv[2], run / "synthetic_reward_curve.png", smooth=5)' \
    "$out/run" reward/synthetic_match/mean \
    || echo "warning: could not plot $out/run/synthetic_reward_curve.png (the metrics are in metrics.jsonl)" >&2

echo "[quickstart 5/5] converting checkpoint-$steps to the SFT .pth format; samples after GRPO -> $out/after.png"
"$PYTHON" scripts/utils/rlckpt_to_sftckpt.py --rl_checkpoint "$out/run/checkpoint-$steps" \
    --output "$out/deepgen_rl_quickstart.pth"

after="$(report "$out/after.png" "after $steps GRPO steps" --checkpoint "$out/deepgen_rl_quickstart.pth")"

echo
echo "before GRPO: $before"
echo "after GRPO:  $after"
echo "Done. Look at:"
echo "  $out/before.png $out/after.png   same prompts, same noise, before / after GRPO (reward under each row)"
echo "  $out/run/synthetic_reward_curve.png   synthetic_match reward per step (the learning curve)"
echo "  $out/run/reward_curve.png        reward/mean (mixes the datasets' rewards, so it is noisier)"
ls "$out"/run/samples/*.png | sed 's/^/  /'
echo "  $out/deepgen_rl_quickstart.pth"
