"""`parrot estimate`: how much memory each device needs, from the model's config alone."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from parrot_cli.cli.common import MODEL_OPTIONS, console, model_choice
from parrot_cli.cli.options import group, shared

_PICK = {o.name: o for o in MODEL_OPTIONS}


@group(*(_PICK[n] for n in ("checkpoint_dir", "model", "precision", "max_seq_length", "quantize", "group_size",
                            "quantize_head", "strategy", "devices", "cpu_offload")))
@dataclass
class PlanOptions:
    """The options of the commands that load a model which change what memory it needs."""

    checkpoint_dir: Any
    model: Any
    precision: Any
    max_seq_length: Any
    quantize: Any
    group_size: Any
    quantize_head: Any
    strategy: Any
    devices: Any
    cpu_offload: Any


@shared()
def estimate(
    device: Annotated[
        str, typer.Option(help="The kind of device to plan for: cuda (GPU memory) or cpu (RAM).")
    ] = "cuda",
    prompt_tokens: Annotated[
        int | None, typer.Option(help="Prompt length whose prefill activations to count (default: the whole context).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the estimate as JSON.")] = False,
    *,
    plan: PlanOptions,
) -> None:
    """Estimate the memory per device (weights, KV cache, activations, overhead) for any
    registry model or checkpoint, quantization and strategy; nothing is downloaded."""
    from parrot_cli.estimate import describe_model
    from parrot_cli.estimate import estimate as plan_memory

    if device not in ("cuda", "cpu"):
        from parrot_cli.errors import UsageError

        raise UsageError(f"--device {device!r}: plan for cuda or cpu.")
    source = describe_model(model_choice(plan.checkpoint_dir, plan.model))
    result = plan_memory(
        source.config,
        name=source.name,
        precision=plan.precision or ("bf16-true" if device == "cuda" else source.cpu_precision),
        device_type=device,
        quantize=_mode(plan.quantize, source.stored_mode),
        group_size=plan.group_size,
        quantize_head=bool(plan.quantize_head),
        stored=source.stored_modules,
        stored_mode=source.stored_mode,
        strategy=plan.strategy,
        devices=plan.devices,
        cpu_offload=bool(plan.cpu_offload),
        max_seq_length=plan.max_seq_length,
        prompt_tokens=prompt_tokens,
    )
    if as_json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return
    _table(result)


def _mode(mode: str | None, stored_mode: str | None) -> str | None:
    """The load-time mode to plan for ('none' -> None); a quantized checkpoint is planned as stored."""
    from parrot_cli.estimate import EXTRA_MODES
    from parrot_cli.quantize import resolve_mode

    if mode is None or mode.strip().lower() in ("none", ""):
        return None
    key = mode.strip().lower()
    if key in EXTRA_MODES:
        return key
    resolved = resolve_mode(key)
    if stored_mode is not None and resolved is not None and resolved.name != stored_mode:
        from parrot_cli.errors import UsageError

        raise UsageError(f"This checkpoint already holds {stored_mode} weights; plan it without --quantize.")
    return None if stored_mode else resolved.name


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    split = "one device" if result.strategy == "none" else (
        f"--strategy {result.strategy} over {result.devices} devices" + (" + CPU offload" if result.cpu_offload else "")
    )
    caption = (
        f"{result.model}: {result.config.num_parameters() / 1e9:.2f}B parameters, {result.quantization} "
        f"weights, {result.precision}, {split}, KV cache for {result.max_seq_length} tokens, activations of a "
        f"{result.prompt_tokens}-token prefill, on {result.device_type}"
    )
    offload = any(r.host for r in result.ranks)
    table = Table(caption=caption, caption_justify="left")
    for column in ("device", "layers", "weights", "KV cache", "activations", "overhead", "total", "host (shards)"):
        if (column == "layers" and not any(r.layers for r in result.ranks)) or (column == "host (shards)" and not offload):
            continue
        table.add_column(column, justify="left" if column in ("device", "layers") else "right")
    for r in result.ranks:
        cells = ["each" if r.rank == "each" else f"rank {r.rank}"]
        if any(x.layers for x in result.ranks):
            cells.append(r.layers)
        cells += [_gb(r.weights), _gb(r.kv_cache), _gb(r.activations), _gb(r.overhead), _gb(r.total)]
        if offload:
            cells.append(_gb(r.host))
        table.add_row(*cells)
    Console(highlight=False, width=None if sys.stdout.isatty() else 1000).print(table)
    for note in result.notes:
        console.print(f"[dim]{note}[/]", soft_wrap=True)
