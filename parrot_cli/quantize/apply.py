"""Which Linears a QuantSpec replaces, and the replacement itself (on the model instance;
`torch.nn.Linear` is never patched).

`checkpoint/load.py` calls `targets` for each block as it assigns the block's weights, and
`quantize_linear` with the float weight straight from the checkpoint (on the device, in
the checkpoint's dtype), so at most one block is ever held in float.
"""

from __future__ import annotations

import torch
from torch import nn

from parrot_cli.errors import CheckpointError
from parrot_cli.quantize import QuantSpec

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
    spec: QuantSpec, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> nn.Module:
    """The quantized replacement of one Linear. `weight` [N, K] is the float weight on the
    target device; `dtype` the working precision (for the bias and what bnb computes in)."""
    if bias is not None:
        bias = bias.to(dtype)
    if spec.mode.family == "bnb":
        from parrot_cli.quantize.bnb import bnb_linear

        module = bnb_linear(spec.mode.name, weight, bias, dtype)
    else:
        from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear

        if spec.mode.name == "int8":
            module = Int8Linear.from_float(weight, bias)
        else:
            module = Int4Linear.from_float(weight, bias, spec.group_size)
    module.quantization = spec.mode.name  # marks it for `quantized_layers`
    return module


def stored_module(
    name: str,
    tensors: dict[str, torch.Tensor],
    meta: dict,
    bias: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> nn.Module:
    """The module for `name` that a quantized checkpoint stores in the portable layout
    (`quantize/format.py`), packed for `device`'s kernel: the embedding table stays in its
    codes (rows are dequantized as they are looked up), every Linear gets the int4 or int8
    kernel. `dtype` is the working precision the embedding returns."""
    from parrot_cli.quantize.format import QuantizedWeight
    from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear, QuantizedEmbedding

    qw = QuantizedWeight.from_tensors(name, tensors, meta)
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
