"""GPTQ over a whole model, block by block (`parrot quantize gptq`).

The calibration windows are embedded once; then each transformer block in turn is loaded
in float onto the device (from the memory-mapped source: nothing else of the model is
resident), calibrated and quantized, run once more to produce the next block's inputs, and
dropped. So every block is calibrated on the outputs of the blocks before it *as
quantized*, and the device holds one float block, the activations of the calibration set
(twice: inputs and outputs) and one Hessian at a time.

Within a block the Linears are quantized in the order the data flows through them,
`attn.qkv`, `attn.proj`, `mlp.fc`, `mlp.proj` ("true sequential"): each one's Hessian is
collected by running the block (with the Linears before it already quantized) up to that
Linear's input, where a hook stops the forward. The fused qkv and [gate; up] each get one
Hessian, since their parts read the same input.

`gptq_blocks` yields the new checkpoint's tensors in order (floats as stored in the
source; a `QuantizedWeight` for every quantized Linear), for a writer to stream to disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parrot_cli.config import Config
from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.quantize import linear_inputs, linear_outputs
from parrot_cli.quantize.format import QuantizedWeight
from parrot_cli.quantize.gptq import Hessian, gptq_quantize
from parrot_cli.quantize.weight_only import KERNEL_GROUP_SIZES, quantize_int4

# In the order the data flows through a block (each is calibrated after those before it).
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
STEPS_PER_BLOCK = len(LINEARS) + 1  # + the pass that makes the next block's inputs
PER_CHANNEL = -1  # --group-size -1: one scale and zero per output row
# Calibration tokens per forward batch: bounds the temporaries (MLP activations, attention).
BATCH_TOKENS = 4096

Entry = tuple[str, "torch.Tensor | QuantizedWeight"]


@dataclass(frozen=True)
class GPTQSettings:
    """How each Linear is quantized."""

    group_size: int = 128  # PER_CHANNEL (-1): one group per output row
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01
    min_zero: int = 0  # 1 keeps asymmetric zero points exact in a Hugging Face v1 file

    def describe(self) -> str:
        group = "per-channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}"
        return f"int4 {group} {'sym' if self.sym else 'asym'}" + (" act-order" if self.act_order else "")

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == PER_CHANNEL else self.group_size


@dataclass
class LayerReport:
    name: str
    error: float  # relative output error on the calibration inputs
    rtn_error: float  # the same for parrot's RTN int4 at the same group size
    damp: float
    retries: int
    dead: int
    seconds: float


@dataclass
class GPTQReport:
    """What a run did, for the summary and the checkpoint's quantization details."""

    settings: GPTQSettings
    layers: list[LayerReport] = field(default_factory=list)
    blocks: int = 0
    seconds: float = 0.0
    peak_device_bytes: int | None = None  # CUDA: max allocated
    peak_rss_bytes: int | None = None

    @property
    def mean_error(self) -> float:
        return sum(r.error for r in self.layers) / max(len(self.layers), 1)

    @property
    def mean_rtn_error(self) -> float:
        return sum(r.rtn_error for r in self.layers) / max(len(self.layers), 1)

    @property
    def better_than_rtn(self) -> int:
        return sum(r.error < r.rtn_error for r in self.layers)

    def damped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.retries]

    def details(self) -> dict[str, Any]:
        """The per-layer record kept in quantization_config.json."""
        return {
            "mean_relative_error": self.mean_error,
            "mean_relative_error_rtn": self.mean_rtn_error,
            "layers": {
                r.name: {"relative_error": round(r.error, 6), "relative_error_rtn": round(r.rtn_error, 6),
                         "damp": r.damp, "dead_inputs": r.dead}
                for r in self.layers
            },
        }


Progress = Callable[[float, int, str], None]  # (blocks done, fractional; total blocks; what)
Notify = Callable[[str], None]


def valid_group_sizes(config: Config) -> list[int]:
    """The group sizes every quantized Linear of this model can take (its inputs divide
    them and the int4 kernel runs them), per-channel (-1) always."""
    inputs = set(linear_inputs(config, quantize_head=False).values())
    return [g for g in KERNEL_GROUP_SIZES if all(k % g == 0 for k in inputs)] + [PER_CHANNEL]


def check_model(config: Config, settings: GPTQSettings) -> None:
    """Every request this model cannot take, as one usage error, before any weight is read."""
    g = settings.group_size
    valid = valid_group_sizes(config)
    if g not in valid:
        sizes = linear_inputs(config, quantize_head=False)
        bad = next((f"{name} ({k})" for name, k in sizes.items() if g > 0 and k % g), None)
        why = f"does not divide the input size of {bad}" if bad else "is not one torch's int4 kernel takes"
        choices = " or ".join(str(v) for v in valid if v != PER_CHANNEL)
        hint = f"use --group-size {choices} (or -1: one group per output row)" if choices else \
            "use --group-size -1 (one group per output row)"
        raise UsageError(f"--group-size {g} {why}; {hint}.")
    for layer, n in linear_outputs(config, quantize_head=False).items():
        if n % 16:
            raise UsageError(
                f"int4 needs output sizes that are multiples of 16, and {layer} has {n}; "
                "this model cannot be quantized with GPTQ."
            )
    if not 0 < settings.damp < 1:
        raise UsageError(f"--damp {settings.damp} is outside (0, 1); 0.01 is the usual value.")


def gptq_blocks(
    config: Config,
    state: dict[str, torch.Tensor],
    windows: torch.Tensor,
    settings: GPTQSettings,
    device: torch.device,
    dtype: torch.dtype,
    report: GPTQReport,
    *,
    progress: Progress | None = None,
    notify: Notify | None = None,
    release: Callable[[Any], None] | None = None,
) -> Iterator[Entry]:
    """Quantize the blocks of the float model `state` (parrot names, memory-mapped) on
    `device`, running the calibration in `dtype`, and yield the new checkpoint's entries
    in order. `release(tensors)` hands a finished block's source pages back to the OS."""
    from parrot_cli.checkpoint.load import on_meta
    from parrot_cli.model import Block, RotaryEmbedding, attention_mask

    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_layer = config.n_layer
    rest = {k: v for k, v in state.items() if not k.startswith("transformer.h.")}
    with torch.inference_mode():
        # The embedding, then the rest of the model's non-block tensors (norm, head).
        wte = rest["transformer.wte.weight"].to(device, dtype)
        inps = nn.functional.embedding(windows.to(device), wte)  # [S, T, E]
        del wte
        outs = torch.empty_like(inps)
        for name in sorted(rest):
            yield name, rest[name]
        # What GPT.forward prepares for a full causal pass over T positions.
        seq_len = windows.size(1)
        rope = RotaryEmbedding(config)
        rope.build(seq_len, device)
        cos, sin = rope(torch.arange(seq_len, device=device), seq_len=seq_len)
        cos, sin = cos.to(dtype), sin.to(dtype)
        mask = attention_mask(None, seq_len, config.sliding_window, device)
        per_batch = max(1, BATCH_TOKENS // seq_len)
        batches = [slice(i, i + per_batch) for i in range(0, inps.size(0), per_batch)]

        def forward(block: nn.Module, rows: slice) -> torch.Tensor:
            return block(inps[rows], cos, sin, None, seq_len, mask)

        for i in range(n_layer):
            prefix = f"transformer.h.{i}."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            block = on_meta(Block, config)
            _load_block(block, part, prefix, device, dtype)
            for step, name in enumerate(LINEARS):
                if progress:
                    progress(i + step / STEPS_PER_BLOCK, n_layer, f"block {i + 1}/{n_layer} {name}")
                linear = block.get_submodule(name)
                hessian = _collect_hessian(block, linear, batches, forward)
                layer = prefix + name
                qw, layer_report = _quantize_linear(layer, linear, hessian, settings, notify)
                report.layers.append(layer_report)
                # Later Linears and the next blocks are calibrated on the quantized weights.
                linear.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
                yield layer + ".weight", _on_cpu(qw)
            if progress:
                progress(i + len(LINEARS) / STEPS_PER_BLOCK, n_layer, f"block {i + 1}/{n_layer} outputs")
            for rows in batches:
                outs[rows] = forward(block, rows)
            inps, outs = outs, inps
            for name in sorted(part):
                if not (name.endswith(".weight") and name[: -len(".weight")] in LINEARS):
                    yield prefix + name, part[name]
            del block
            if release is not None:
                release(part.values())
            report.blocks = i + 1
            if progress:
                progress(i + 1, n_layer, f"block {i + 1}/{n_layer} done")
    report.seconds = time.perf_counter() - started
    if device.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(device)


def _load_block(block: nn.Module, part: dict[str, torch.Tensor], prefix: str,
                device: torch.device, dtype: torch.dtype) -> None:
    expected = set(block.state_dict())
    if set(part) != expected:
        missing = sorted(expected - set(part)) or sorted(set(part) - expected)
        raise CheckpointError(f"The source checkpoint does not match its config ({prefix}{missing[0]}).")
    floats = {k: v.to(device, dtype) for k, v in part.items()}
    try:
        block.load_state_dict(floats, strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"The source checkpoint has weights of the wrong shape in {prefix[:-1]} ({err}).") from err
    block.eval().requires_grad_(False)


class _Stop(Exception):
    """Raised by a hook once the input it wanted has been seen: the rest of the forward
    is not needed for this Hessian."""


def _collect_hessian(block: nn.Module, linear: nn.Linear, batches: list[slice], forward) -> Hessian:
    hessian = Hessian(linear.in_features, linear.weight.device)

    def hook(_module: nn.Module, args: tuple) -> None:
        hessian.add(args[0])
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        for rows in batches:
            try:
                forward(block, rows)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hessian


def _quantize_linear(
    name: str, linear: nn.Linear, hessian: Hessian, settings: GPTQSettings, notify: Notify | None
) -> tuple[QuantizedWeight, LayerReport]:
    start = time.perf_counter()
    weight = linear.weight
    group = settings.group_for(linear.in_features)

    def retried(damp: float) -> None:
        if notify:
            notify(f"{name}: the Hessian is not positive definite; retrying with damping {damp:g}.")

    rtn = quantize_int4(weight, group).dequantize()  # what --quantize int4 would give, for the summary
    result = gptq_quantize(weight, hessian.take(), group_size=group, sym=settings.sym,
                           act_order=settings.act_order, damp=settings.damp, min_zero=settings.min_zero,
                           baseline=rtn, on_retry=retried)
    layer = LayerReport(name, result.error, result.baseline_error, result.damp, result.retries, result.dead,
                        time.perf_counter() - start)
    return result.weight, layer


def _on_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.cpu()

    return replace(qw, data=cpu(qw.data), scales=cpu(qw.scales), zeros=cpu(qw.zeros),
                   qzeros=cpu(qw.qzeros), perm=cpu(qw.perm))


def source_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    from parrot_cli.checkpoint.store import load_weights

    return load_weights(checkpoint_dir)
