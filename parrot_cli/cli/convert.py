"""`parrot convert SOURCE`: a Hugging Face directory, a .gguf file or a known model -> a
parrot checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from parrot_cli.cli.common import console


def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="A Hugging Face checkpoint directory, a .gguf file, or a known model name with a fetchable source."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Checkpoint directory to write (default: under the checkpoints root)."),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(help="Weight dtype to store: auto (as the source: a GGUF's quantized tensors stay quantized, int4 or int8, and its F16 ones 16-bit), or float32, bfloat16, float16 for a float checkpoint (a GGUF dequantized)."),
    ] = "auto",
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="Do nothing when the target checkpoint already exists.")
    ] = False,
) -> None:
    """Convert a model into a parrot checkpoint (safetensors, atomic: all or nothing)."""
    from parrot_cli.checkpoint.convert import target_for
    from parrot_cli.checkpoint.store import CONFIG_FILE

    if if_missing and (target_for(source, output) / CONFIG_FILE).is_file():
        console.print(f"{target_for(source, output)} already exists.")
        return

    from parrot_cli.cli.common import terminate_as_interrupt

    with terminate_as_interrupt():
        target = convert_with_progress(source, output, dtype=dtype)
    console.print(f"Checkpoint written to [bold]{target}[/]")
    print_weights_summary(target, Path(source) if Path(source).is_file() else None)
    console.print(run_hint(target), soft_wrap=True)


def run_hint(target: Path) -> str:
    """'Run it: parrot generate "Hello" -m ORG/NAME' (or --checkpoint-dir outside the root)."""
    from parrot_cli.paths import checkpoints_root

    try:  # under the root a checkpoint is named by its org/name; elsewhere by its path
        selector = f"-m {target.resolve().relative_to(checkpoints_root().resolve())}"
    except ValueError:
        selector = f"--checkpoint-dir {target}"
    return f'Run it: [bold]parrot generate "Hello" {selector}[/]'


def print_weights_summary(target: Path, source: Path | None = None) -> None:
    """What the weights became: for a GGUF import kept quantized, each source type's
    mapping ('Q4_1 -> int4 g32 x120 (exact up to bf16 scale rounding)') and the size
    beside the source file's."""
    from parrot_cli.checkpoint.info import read_info, weight_files
    from parrot_cli.cli.manage import _human_bytes
    from parrot_cli.quantize.qconfig import read_quantization_config

    stored = read_quantization_config(target)
    if stored is None:
        return
    size = sum(f.stat().st_size for f in weight_files(target))
    source = source or Path(read_info(target).provenance.get("source") or "")
    before = f" (the GGUF: {_human_bytes(source.stat().st_size)})" if source.is_file() else ""
    console.print(f"Weights: {'; '.join(stored.mapping())}", soft_wrap=True)
    rounding = stored.details.get("scale_rounding")
    if rounding:
        console.print(
            f"[dim]bf16 rounding of the exact int4 scales: max {rounding['scale_rel_max']:.2%}, "
            f"mean {rounding['scale_rel_mean']:.2%} relative.[/]", soft_wrap=True,
        )
    console.print(f"Size: {_human_bytes(size)}{before}, {stored.summary()}.", soft_wrap=True)


def convert_with_progress(
    source: str | Path, output: Path | None, *, dtype: str = "auto", source_label: str | None = None
) -> Path:
    """`checkpoint.convert.convert` under the conversion's progress bar (shared with `parrot download`)."""
    from parrot_cli.checkpoint.convert import convert as run_convert
    from parrot_cli.cli.common import step_progress

    with step_progress("Converting") as update:
        return run_convert(source, output, dtype=dtype, progress=update, source_label=source_label)
