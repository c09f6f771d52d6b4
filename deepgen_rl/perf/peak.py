"""Dense bf16 peak TFLOP/s of common training GPUs (vendor data sheets, without sparsity), by device name."""

from __future__ import annotations

from typing import Optional

# Checked in order (H200 and H20 before H2, the PCIe / NVL variants before their SXM parts).
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "NVL"), 835.0),
    (("H200",), 989.4),
    (("H20",), 148.0),
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.4),
    (("A100",), 312.0),
    (("L40S",), 362.1),
)


def peak_tflops_of(device_name: str) -> Optional[float]:
    """The bf16 dense peak of a device named e.g. 'NVIDIA H100 80GB HBM3', or None when not in the table."""
    name = device_name.upper()
    for words, peak in BF16_DENSE_PEAK_TFLOPS:
        if all(word in name for word in words):
            return peak
    return None


def default_peak_tflops(flag: Optional[float]) -> Optional[float]:
    """--gpu_peak_tflops when given (> 0), else the current CUDA device's table entry, else None (MFU omitted)."""
    if flag is not None and flag > 0:
        return float(flag)
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_of(torch.cuda.get_device_name())
