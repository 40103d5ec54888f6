"""What the machine computes fast, for choices both training and serving make."""

from __future__ import annotations

import functools
from pathlib import Path


def serving_device(name: str):
    """The torch device a setting names: "auto" is the first CUDA device
    when one is visible, else the CPU; "cpu", "cuda" or "cuda:N" by name."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(
            f"{name} is not a CUDA device this process can see ({torch.cuda.device_count()} visible): "
            "check CUDA_VISIBLE_DEVICES and the GPU's driver, or use auto or cpu"
        )
    return device


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether bfloat16 matmuls run natively on this machine's "cuda" or
    "cpu": CUDA with bf16, or a CPU with AVX512-BF16 or AMX (there they run
    about twice as fast as float32; elsewhere bfloat16 is emulated, slower)."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags
