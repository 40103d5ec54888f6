"""What the machine computes fast, for choices both training and serving make."""

from __future__ import annotations

import functools
from pathlib import Path


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
