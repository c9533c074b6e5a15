"""bitsandbytes modes: LLM.int8 (`Linear8bitLt`) and 4-bit NF4/FP4 (`Linear4bit`).

bitsandbytes 0.50 runs both layers on CPU tensors as well as CUDA ones. It is an optional
dependency (`pip install 'parrot-cli[bnb]'`, ~125 MB): imported only when a bnb mode is
asked for, with its import-time and per-call log noise silenced (a warning that an
optional CPU kernel package is absent; "inputs will be cast to float16" on every call).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from parrot_cli.errors import UsageError

INSTALL = "pip install 'parrot-cli[bnb]'"
OUTLIER_THRESHOLD = 6.0  # LLM.int8: input features above this stay in fp16


def require_bitsandbytes(mode: str) -> Any:
    """Import bitsandbytes (quietly) or say in one sentence how to get it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except Exception as err:  # missing, or present but unable to load its libraries
        raise UsageError(
            f"--quantize {mode} needs bitsandbytes, which is not installed or does not "
            f"load here; install it with `{INSTALL}` or use --quantize int8/int4."
        ) from err
    return bitsandbytes


def bnb_linear(
    mode: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> nn.Module:
    """A bitsandbytes layer holding `weight` [N, K] quantized on weight's device; `dtype` is
    the working precision (the 4-bit layers compute in it, LLM.int8 in fp16)."""
    bnb = require_bitsandbytes(mode)
    n, k = weight.shape
    device = weight.device
    if mode == "llm.int8":
        layer = bnb.nn.Linear8bitLt(
            k, n, bias=bias is not None, has_fp16_weights=False, threshold=OUTLIER_THRESHOLD, device="meta"
        )
        # Int8Params quantizes when moved off the CPU-side float copy onto a device.
        param = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float16), requires_grad=False,
                                  has_fp16_weights=False)
        layer.weight = param.to(device)
    else:
        quant_type = "nf4" if "nf4" in mode else "fp4"
        double = mode.endswith("-dq")
        layer = bnb.nn.Linear4bit(
            k, n, bias=bias is not None, compute_dtype=dtype, compress_statistics=double,
            quant_type=quant_type, quant_storage=torch.uint8, device="meta",
        )
        param = bnb.nn.Params4bit(weight.detach().to(dtype), requires_grad=False,
                                  compress_statistics=double, quant_type=quant_type)
        layer.weight = param.to(device)  # Params4bit quantizes on its first move to a device
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
    # Quantization statistics live outside the parameters: count them for LLM.weight_bytes.
    layer.nbytes = _statistics_bytes(layer)
    return layer.eval().requires_grad_(False)


def _statistics_bytes(layer: nn.Module) -> int:
    """Bytes of the scales bitsandbytes keeps beside the quantized weight (the row scales of
    LLM.int8; the block absmax, code book and, with -dq, their own scales for 4-bit)."""
    weight = layer.weight
    tensors: list[torch.Tensor] = []
    if getattr(weight, "SCB", None) is not None:
        tensors.append(weight.SCB)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        tensors += [t for t in state.as_dict(packed=False).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)
