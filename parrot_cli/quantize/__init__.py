"""Quantization at load time: the one table of modes, and the checks that run before any
weight is read.

`--quantize MODE` replaces every Linear of the transformer blocks (and the head, with
`--quantize-head`) by a quantized module while the checkpoint is loaded, block by block
(`checkpoint/load.py` calls `apply.quantize_linear`). Embeddings and norms stay in the
working precision. Modes, by family:

- bitsandbytes (`quantize/bnb.py`): `llm.int8` (alias `bnb.int8`), `bnb.nf4`, `bnb.nf4-dq`,
  `bnb.fp4`, `bnb.fp4-dq`; CPU and CUDA.
- weight-only (`quantize/weight_only.py`): `int8` (per output channel) and `int4` (groups of
  `--group-size` along the input), on torch's own packed-weight kernels, which exist to
  decode faster than dense bf16.
- `gptq.int4`: a checkpoint's own mode, never applied at load: GPTQ weights are made by
  `parrot quantize gptq` (`quantize/gptq*.py`) or imported from a Hugging Face GPTQ repo,
  and run on the same int4 kernels.

This module imports no torch (the settings help and the CLI read the mode table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from parrot_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from parrot_cli.config import Config
    from parrot_cli.quantize.qconfig import QuantizationConfig


@dataclass(frozen=True)
class Mode:
    name: str
    family: str  # "bnb" | "weight_only" | "gptq": the module in this package that implements it
    bits: int
    summary: str
    devices: tuple[str, ...] = ("cpu", "cuda")


MODES: dict[str, Mode] = {
    m.name: m
    for m in [
        Mode("llm.int8", "bnb", 8, "bitsandbytes LLM.int8 (int8 with fp16 outliers above 6.0)"),
        Mode("bnb.nf4", "bnb", 4, "bitsandbytes 4-bit NormalFloat"),
        Mode("bnb.nf4-dq", "bnb", 4, "bnb.nf4 with its scales quantized too"),
        Mode("bnb.fp4", "bnb", 4, "bitsandbytes 4-bit float"),
        Mode("bnb.fp4-dq", "bnb", 4, "bnb.fp4 with its scales quantized too"),
        Mode("int8", "weight_only", 8, "int8 weights, one scale per output channel (torch kernel)"),
        Mode("int4", "weight_only", 4, "int4 weights, scale and zero per group (torch kernel)"),
        Mode("gptq.int4", "gptq", 4, "GPTQ int4 weights: a checkpoint made by `parrot quantize gptq` or imported"),
    ]
}
ALIASES = {"bnb.int8": "llm.int8"}
NONE = ("none", "")
# Group sizes torch's int4 kernels accept, largest (smallest scale overhead) first.
INT4_GROUP_SIZES = (256, 128, 64, 32)
DEFAULT_GROUP_SIZES = (128, 64, 32)  # 256 loses too much; 32 keeps the most
# llama.cpp 4-bit types quantized in blocks of 32 along the input: re-quantizing their
# dequantized weights in groups of 32 lands back on (almost) the same grid.
GGUF_BLOCK32_4BIT = {"Q4_0", "Q4_1", "Q4_K"}


def modes_help() -> str:
    """The modes as one line for --help and the settings table."""
    names = [f"{m} (alias {a})" if (a := _alias_of(m)) else m for m in MODES]
    return "none, " + ", ".join(names)


def _alias_of(name: str) -> str | None:
    return next((a for a, target in ALIASES.items() if target == name), None)


def resolve_mode(name: str | None) -> Mode | None:
    """The Mode for a user's string (None for no quantization); unknown names are a
    usage error that lists the valid ones."""
    if name is None or name.strip().lower() in NONE:
        return None
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODES:
        raise UsageError(f"Unknown quantization mode {name!r}; choose one of {modes_help()}.")
    return MODES[key]


@dataclass(frozen=True)
class QuantSpec:
    """What `build_model` needs to quantize while loading."""

    mode: Mode
    group_size: int | None = None  # int4 only
    quantize_head: bool = False

    def describe(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        head = ", head too" if self.quantize_head else ""
        return f"{self.mode.name}{group}{head}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.name, "group_size": self.group_size, "quantize_head": self.quantize_head}


def linear_inputs(config: Config, quantize_head: bool) -> dict[str, int]:
    """Input size of each kind of Linear that gets quantized (the model's layout: qkv and
    mlp.fc read n_embd, attn.proj reads the heads, mlp.proj the intermediate size)."""
    q_size = config.qkv_sizes[0]
    inputs = {
        "attn.qkv": config.n_embd,
        "attn.proj": q_size,
        "mlp.fc": config.n_embd,
        "mlp.proj": config.intermediate_size,
    }
    if quantize_head:
        inputs["lm_head"] = config.n_embd
    return inputs


def linear_outputs(config: Config, quantize_head: bool) -> dict[str, int]:
    """Output size of each kind of quantized Linear (torch's CPU int4 packing needs
    multiples of 16)."""
    fc = config.intermediate_size * (2 if config.mlp_class == "GatedMLP" else 1)
    outputs = {"attn.qkv": sum(config.qkv_sizes), "attn.proj": config.n_embd, "mlp.fc": fc,
               "mlp.proj": config.n_embd}
    if quantize_head:
        outputs["lm_head"] = config.vocab_size
    return outputs


def default_group_size(config: Config, quantize_head: bool, provenance: dict[str, Any] | None = None) -> int:
    """The int4 group size for a model: 32 when the weights came from a llama.cpp 4-bit
    file quantized in blocks of 32 (re-quantizing on the same blocks keeps their values),
    else the largest of 128/64/32 that divides every quantized layer's input size."""
    sizes = set(linear_inputs(config, quantize_head).values())
    types = set(((provenance or {}).get("gguf_metadata") or {}).get("tensor_types") or {})
    if types & GGUF_BLOCK32_4BIT and all(s % 32 == 0 for s in sizes):
        return 32
    for group in DEFAULT_GROUP_SIZES:
        if all(s % group == 0 for s in sizes):
            return group
    raise UsageError(
        f"int4 needs every layer's input size to be a multiple of 32, and this model has "
        f"{', '.join(str(s) for s in sorted(sizes))}; use --quantize int8 or bnb.nf4."
    )


def plan(
    mode_name: str | None,
    config: Config,
    device: torch.device,
    *,
    group_size: int | None = None,
    group_size_from_user: bool = False,
    quantize_head: bool = False,
    provenance: dict[str, Any] | None = None,
    stored: QuantizationConfig | None = None,
) -> QuantSpec | None:
    """Check a quantization request against the model, the device and what the checkpoint
    already holds (`stored`: its quantization config) before any weight is read; every
    impossible request is one UsageError sentence that says what to do."""
    mode = resolve_mode(mode_name)
    if stored is not None:
        return _plan_on_quantized(mode, stored, config, device, group_size, group_size_from_user,
                                  quantize_head, provenance)
    if mode is None:
        if group_size is not None and group_size_from_user:
            raise UsageError("--group-size applies to --quantize int4 only.")
        return None
    if mode.family == "gptq":
        raise UsageError(
            f"--quantize {mode.name} loads a GPTQ checkpoint, and this one holds float weights; "
            "make one with `parrot quantize gptq` (or convert a Hugging Face GPTQ repo), or use --quantize int4."
        )
    if device.type not in mode.devices:
        raise UsageError(
            f"--quantize {mode.name} runs on {' or '.join(d.upper() for d in mode.devices)}, "
            f"not on {device.type}; choose --device cpu or cuda."
        )
    if mode.family == "bnb":
        from parrot_cli.quantize.bnb import require_bitsandbytes

        require_bitsandbytes(mode.name)
    if mode.name != "int4":
        if group_size is not None and group_size_from_user:
            raise UsageError(f"--group-size applies to --quantize int4 only, not {mode.name}.")
        return QuantSpec(mode, None, quantize_head)
    if device.type == "cuda":
        from parrot_cli.quantize.weight_only import require_int4_cuda

        require_int4_cuda(device)
    if group_size is None:
        group_size = default_group_size(config, quantize_head, provenance)
    if group_size not in INT4_GROUP_SIZES:
        raise UsageError(
            f"--group-size {group_size} is not one torch's int4 kernel takes; "
            f"use {', '.join(str(g) for g in sorted(INT4_GROUP_SIZES))}."
        )
    outputs = linear_outputs(config, quantize_head)
    for layer, size in outputs.items():
        if size % 16:
            raise UsageError(
                f"--quantize int4 needs output sizes that are multiples of 16, and {layer} has "
                f"{size}; use --quantize int8."
            )
    inputs = linear_inputs(config, quantize_head)
    for layer, size in inputs.items():
        if size % group_size:
            fits = [str(g) for g in sorted(INT4_GROUP_SIZES) if all(s % g == 0 for s in inputs.values())]
            hint = f"use --group-size {' or '.join(fits)}" if fits else "use --quantize int8"
            raise UsageError(
                f"--group-size {group_size} does not divide the input size {size} of {layer}; {hint}."
            )
    return QuantSpec(mode, group_size, quantize_head)


def _plan_on_quantized(
    mode: Mode | None,
    stored: QuantizationConfig,
    config: Config,
    device: torch.device,
    group_size: int | None,
    group_size_from_user: bool,
    quantize_head: bool,
    provenance: dict[str, Any] | None,
) -> QuantSpec | None:
    """A quantized checkpoint loads as it is stored (no flag needed). Asking for its own
    mode changes nothing (but may quantize a float head); any other mode would quantize
    quantized weights again, so the error names the float source to quantize instead."""
    if mode is not None and mode.name != stored.mode:
        float_dir = (provenance or {}).get("quantized_from")  # written by `parrot quantize`
        if float_dir:
            fix = f"load the float checkpoint {float_dir} with --quantize {mode.name} instead"
        else:
            source = (provenance or {}).get("source")
            where = f" ({source})" if source else ""
            fix = f"convert its float source{where} and quantize that"
        raise UsageError(
            f"This checkpoint already holds {stored.summary()} weights; --quantize {mode.name} "
            f"needs a float checkpoint: {fix}."
        )
    if group_size is not None and group_size_from_user:
        raise UsageError("--group-size applies when quantizing a float checkpoint, not to an already quantized one.")
    if device.type == "cuda" and any(m.get("bits") == 4 for m in stored.modules.values()):
        from parrot_cli.quantize.weight_only import require_int4_cuda

        require_int4_cuda(device)
    if mode is None or not quantize_head or mode.family != "weight_only":
        return None
    # The float head of an int4/int8 checkpoint can still be quantized at load.
    spec = plan(mode.name, config, device, quantize_head=True, provenance=provenance)
    return spec
