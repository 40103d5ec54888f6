"""Linear layers whose weights are reordered once for oneDNN, on CPU.

PyTorch's CPU linear hands oneDNN each weight in its plain row-major layout
on every call. Reordered once into oneDNN's own blocked layout, as
torch.compile does for frozen CPU graphs (`mkldnn._reorder_linear_weight`),
the same matmuls run about twice as fast at decoding sizes, a few rows a
step (bench/results/inference-*.md), with the same results. A served base
model's weights never change, so the reorder is done once at load.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Linear):
    """An inference-only nn.Linear holding its weight in oneDNN's layout.

    It stays an nn.Linear (in_features, out_features, bias) so that adapters
    are matched and wrapped as on a plain one; its weight is an opaque
    oneDNN tensor that only `_linear_pointwise` reads."""

    def __init__(self, linear: nn.Linear, batch_size_hint: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_size_hint))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module, batch_size_hint: int) -> int:
    """Replaces every plain CPU nn.Linear of `model` by a PackedLinear with
    the same outputs; returns how many. Changes nothing (returns 0) where
    oneDNN is not available or its packed linear does not match a plain one."""
    linears = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype in _PACKABLE_DTYPES
    ]
    if not linears or not _packed_linear_works(linears[0][1]):
        return 0
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear, batch_size_hint))
    return len(linears)


def _packed_linear_works(linear: nn.Linear) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    # A fixed input: drawing one would move the global random state at load.
    x = torch.linspace(-1, 1, 3 * linear.in_features, dtype=linear.weight.dtype).reshape(3, linear.in_features)
    try:
        with torch.inference_mode():
            packed, plain = PackedLinear(linear, 3)(x), linear(x)
    except RuntimeError as exc:  # a torch build without oneDNN's packed linear
        log.warning("oneDNN packed linear unavailable, serving plain linear layers: %s", exc)
        return False
    tolerance = 1e-2 if linear.weight.dtype == torch.bfloat16 else 1e-4
    return torch.allclose(packed.float(), plain.float(), rtol=tolerance, atol=tolerance)
