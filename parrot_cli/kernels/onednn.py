"""Faster kernels swapped into a loaded model for the device it runs on.

On CPU, oneDNN's prepacked linear (`mkldnn._linear_pointwise` on a weight reordered once
by `mkldnn._reorder_linear_weight`) avoids re-laying out the weight on every call: for
SmolLM2's shapes at batch 1 it measured 2-4x faster than `F.linear` in bf16 (the
49152x576 head: 3.7 ms -> 0.9 ms) and up to 2x in fp32. The model file stays plain; this
module replaces `nn.Linear` modules on the model instance, never `torch.nn.Linear` itself.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight lives in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.dtype = weight.dtype
        # The packed weight is an opaque mkldnn tensor: kept as a plain attribute so that
        # state_dict() and .to() never try to treat it as a dense parameter.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.nbytes = weight.numel() * weight.element_size()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.dtype}"


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def pack_linears(model: nn.Module) -> int:
    """Replace every plain nn.Linear in `model` by a PackedLinear; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
