#!/usr/bin/env bash
# The one command to run on the GPU machine (no network; Python 3.12 with its own torch): installs the wheel kit
# built by scripts/gpu_kit.sh into a temporary folder, puts it and this checkout on PYTHONPATH, prints the versions
# it runs with, and runs benchmarks/gpu_check.py (every part, judged: exit 1 when a check fails). Everything it
# prints, and gpu_check.json, also goes to $OUT when that is set.
#
#   bash scripts/gpu_kit.sh                       # here, once (needs the package index)
#   bash scripts/gpu_check.sh                     # there (the .whl/ folder travels with the checkout)
#   bash scripts/gpu_check.sh --only edit,convert # a part, for a second call
#   bash scripts/gpu_check.sh --smoke             # the same sequence on tiny parts on the CPU (try it here)
#
# Sized to finish in under 8 minutes on one H100 including imports (gpu_check.py fails the run past --budget_s 480).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
python_bin="${PYTHON:-python3}"
kit_dir="${GPU_KIT_DIR:-.whl}"
if ! ls "$kit_dir"/*.whl >/dev/null 2>&1; then
    echo "[gpu_check.sh] ERROR: no wheels in $kit_dir/: run 'bash scripts/gpu_kit.sh' where the package index is" \
         "reachable, and bring $kit_dir/ along with the checkout." >&2
    exit 2
fi
target="$(mktemp -d /tmp/deepgen_kit.XXXXXX)"
trap 'rm -rf "$target"' EXIT
"$python_bin" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$target" \
    "$kit_dir"/*.whl
export PYTHONPATH="$target:$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline SWANLAB_MODE=offline

log=/dev/null
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    log="$OUT/gpu_check.log"
fi
{
    "$python_bin" - <<'PY'
import sys

import torch

# What the check imports: the kit's packages and those it expects the machine to have (scripts/gpu_kit.txt).
NEEDED = ("transformers", "diffusers", "deepspeed", "peft", "accelerate", "pydantic", "mmengine", "fastapi",
          "uvicorn", "httpx", "numpy", "PIL", "tokenizers", "huggingface_hub", "safetensors", "yaml", "matplotlib")
versions, missing = {"python": sys.version.split()[0], "torch": torch.__version__}, []
for name in NEEDED:
    try:
        module = __import__(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
        continue
    if name in NEEDED[:7]:
        versions[name] = f"{module.__version__} ({module.__file__.rsplit('/', 2)[0]})"
if missing:
    sys.exit("[gpu_check.sh] ERROR: cannot import " + "; ".join(missing) + ". The kit holds what the GPU machine "
             "lacks; the rest (scripts/gpu_kit.txt, first lines) must be installed beside this python's torch.")
print("[gpu_check.sh] " + ", ".join(f"{k} {v}" for k, v in versions.items()))
print("[gpu_check.sh] device: " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"))
PY
    "$python_bin" benchmarks/gpu_check.py "$@"
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
