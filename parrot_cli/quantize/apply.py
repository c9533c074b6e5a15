"""Which Linears a QuantSpec replaces, and the replacement itself (on the model instance;
`torch.nn.Linear` is never patched).

`checkpoint/load.py` calls `targets` for each block as it assigns the block's weights, and
`quantize_linear` with the float weight straight from the checkpoint (on the device, in
the checkpoint's dtype), so at most one block is ever held in float.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from parrot_cli.errors import CheckpointError
from parrot_cli.quantize import QuantSpec

# Keeps a part of a weight (a float tensor or a format.QuantizedWeight): a shard's cut.
Select = Callable[[Any], Any]

BLOCKS = "transformer.h."
HEAD = "lm_head"
EMBEDDING = "transformer.wte"
INT4_OUTPUT_MULTIPLE = 16  # torch's int4 weight packing takes row counts in multiples of 16


def targets(model: nn.Module, spec: QuantSpec | None) -> set[str]:
    """Names of the modules to quantize: every nn.Linear inside the transformer blocks, and
    the head with `quantize_head`. Embeddings and norms are not Linears: they stay."""
    if spec is None:
        return set()
    names = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(BLOCKS)
    }
    if spec.quantize_head:
        names.add(HEAD)
    return names


def quantize_linear(
    spec: QuantSpec,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    select: Select | None = None,
) -> nn.Module:
    """The quantized replacement of one Linear. `weight` [N, K] is the float weight on the
    target device; `dtype` the working precision (for the bias and what bnb computes in).
    `select` keeps a part of the weight (a tensor-parallel shard, already applied to
    `bias`): int4/int8 quantize the whole weight and cut the codes, so a shard holds
    exactly the values one device would; bitsandbytes quantizes the cut float weight."""
    if bias is not None:
        bias = bias.to(dtype)
    if spec.mode.family == "bnb":
        from parrot_cli.quantize.bnb import bnb_linear

        module = bnb_linear(spec.mode.name, select(weight) if select else weight, bias, dtype)
    else:
        from parrot_cli.quantize.weight_only import (
            Int4Linear,
            Int8Linear,
            quantize_int4,
            quantize_int8,
        )

        if spec.mode.name == "int8":
            qw = quantize_int8(weight)
        else:
            qw = quantize_int4(weight, spec.group_size)
        qw = select(qw) if select else qw
        module = (Int8Linear if qw.bits == 8 else Int4Linear).from_quantized(qw, bias)
    module.quantization = spec.mode.name  # marks it for `quantized_layers`
    return module


def stored_module(
    name: str,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    bias: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
    select: Select | None = None,
) -> nn.Module:
    """The module for `name` that a quantized checkpoint stores in the portable layout
    (`quantize/format.py`), packed for `device`'s kernel: the embedding table stays in its
    codes (rows are dequantized as they are looked up), every Linear gets the int4 or int8
    kernel. `dtype` is the working precision the embedding returns; `select` keeps a part
    of the weight (a tensor-parallel shard), cut before anything is packed."""
    from parrot_cli.quantize.format import QuantizedWeight
    from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear, QuantizedEmbedding

    qw = QuantizedWeight.from_tensors(name, tensors, meta)
    if select is not None:
        qw = select(qw)
    if name == EMBEDDING:
        return QuantizedEmbedding(qw, dtype).to(device)
    if qw.bits == 4 and qw.out_features % INT4_OUTPUT_MULTIPLE:
        # torch's int4 packing refuses such a matrix with a bare RuntimeError; say what is wrong.
        raise CheckpointError(
            f"The quantized weight {name} has {qw.out_features} outputs; torch's int4 kernel "
            f"needs a multiple of {INT4_OUTPUT_MULTIPLE}."
        )
    if bias is not None and tuple(bias.shape) != (qw.out_features,):
        raise CheckpointError(f"{name}.bias is {list(bias.shape)}, not [{qw.out_features}].")
    module = (Int4Linear if qw.bits == 4 else Int8Linear).from_quantized(qw, bias, device)
    module.quantization = meta.get("mode") or f"int{qw.bits}"
    return module


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` was (e.g. transformer.h.3.attn.qkv)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized modules of a loaded model, by name."""
    return {
        name: module
        for name, module in model.named_modules()
        if getattr(module, "quantization", None) is not None
    }
