#!/usr/bin/env bash
# Build .whl/: the wheels the GPU machine needs to run benchmarks/gpu_check.py (it has no network).
#
#   bash scripts/gpu_kit.sh             # download (CPython 3.12, manylinux x86_64) + build deepspeed's wheel
#   bash scripts/gpu_kit.sh --dry-run   # list what it would fetch and build; no network
#
# What goes in and why: scripts/gpu_kit.txt (what the machine lacks or holds at another version; its own torch is
# used as it is). deepspeed has no wheel on the index, so its pure-Python wheel is built here with DS_BUILD_OPS=0.
# The kit must stay under 60 MiB (what one call to the GPU machine carries, beside the repository). The last line
# printed is the command that installs it there; scripts/gpu_check.sh runs it for you.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
kit_list="scripts/gpu_kit.txt"
kit_dir="${GPU_KIT_DIR:-.whl}"
max_mib=60
python_version="3.12"
platforms=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64
           manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)
# deepspeed's version is our pin in pyproject.toml (one place).
deepspeed_pin="$(sed -n 's/^ *"\(deepspeed==[^"]*\)",*$/\1/p' pyproject.toml)"
[ -n "$deepspeed_pin" ] || { echo "[gpu_kit.sh] ERROR: no deepspeed==X pin found in pyproject.toml" >&2; exit 1; }
mapfile -t wheels < <(grep -v '^\s*\(#\|$\)' "$kit_list")

case "${1:-}" in
    --dry-run)
        echo "[gpu_kit.sh] would fetch ${#wheels[@]} wheels for CPython $python_version manylinux x86_64 into $kit_dir/:"
        printf '  %s\n' "${wheels[@]}"
        echo "[gpu_kit.sh] would build: $deepspeed_pin (pure Python, DS_BUILD_OPS=0)"
        exit 0 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_kit.sh [--dry-run]" >&2; exit 2 ;;
esac

source scripts/utils/python_env.sh
pick_python  # $PYTHON, the active env, else the repo's .venv: it builds deepspeed's wheel (its setup reads torch)
mkdir -p "$kit_dir"
rm -f "$kit_dir"/*.whl
platform_flags=()
for platform in "${platforms[@]}"; do platform_flags+=(--platform "$platform"); done
echo "[gpu_kit.sh] downloading ${#wheels[@]} wheels (CPython $python_version, manylinux x86_64)"
"$python_bin" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp "${platform_flags[@]}" -d "$kit_dir" "${wheels[@]}"
echo "[gpu_kit.sh] building $deepspeed_pin without its C++/CUDA ops"
DS_BUILD_OPS=0 "$python_bin" -m pip wheel --quiet --no-deps --no-build-isolation -w "$kit_dir" "$deepspeed_pin"

count="$(ls "$kit_dir"/*.whl | wc -l)"
expected=$(( ${#wheels[@]} + 1 ))
if [ "$count" -ne "$expected" ]; then
    echo "[gpu_kit.sh] ERROR: $kit_dir holds $count wheels, expected $expected (one per line of $kit_list + deepspeed)" >&2
    ls "$kit_dir" >&2
    exit 1
fi
bytes="$(du -cb "$kit_dir"/*.whl | tail -1 | cut -f1)"
mib="$(( (bytes + 1048575) / 1048576 ))"
echo "[gpu_kit.sh] $count wheels, $mib MiB in $kit_dir/:"
ls -1 "$kit_dir"
if [ "$bytes" -gt $(( max_mib * 1048576 )) ]; then
    echo "[gpu_kit.sh] ERROR: the kit is $mib MiB, over its $max_mib MiB limit: drop what the check does not import" >&2
    exit 1
fi
echo "[gpu_kit.sh] install it on the GPU machine (scripts/gpu_check.sh does this):"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/deepgen_kit $kit_dir/*.whl && export PYTHONPATH=/tmp/deepgen_kit:\$PWD"
