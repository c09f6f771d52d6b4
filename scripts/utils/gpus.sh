# Shared by scripts/train.sh and the vLLM launchers (sourced, not run): the GPUs this launch may use.
#
# After `source`, call:   count_gpus   -> sets gpu_count and gpu_source (what the count came from, for the
#                                         "GPUs taken" line every launcher prints)
#
# CUDA_VISIBLE_DEVICES wins when set (what CUDA itself honours: `nvidia-smi -L` lists every GPU of the machine,
# whatever the variable says); else `nvidia-smi -L`; else gpu_count=0.

count_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local ids id
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        gpu_count=0
        for id in "${ids[@]}"; do
            id="${id// /}"
            [ -n "$id" ] || continue
            # CUDA reads indices, GPU-<uuid> or MIG-<uuid>; it ignores everything from the first entry it cannot
            # read (a "-1" hides every GPU), so a range such as 0-5 would silently mean fewer GPUs than meant.
            if [[ "$id" =~ ^-[0-9]+$ ]]; then
                break
            fi
            if ! [[ "$id" =~ ^([0-9]+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+)$ ]]; then
                echo "error: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: '$id' is not a GPU index or UUID; CUDA" \
                     "wants a comma-separated list, e.g. CUDA_VISIBLE_DEVICES=0,1,2,3,4,5 (no ranges)." >&2
                exit 2
            fi
            gpu_count=$((gpu_count + 1))
        done
        gpu_source="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
        gpu_count="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
        gpu_source="all GPUs of this machine (nvidia-smi -L; CUDA_VISIBLE_DEVICES is not set)"
    else
        gpu_count=0
        gpu_source="no GPU found (no CUDA_VISIBLE_DEVICES, no working nvidia-smi)"
    fi
}
