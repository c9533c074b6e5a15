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
        typer.Option(help="Weight dtype to store: auto (as the source; float32 for dequantized GGUF), float32, bfloat16, float16."),
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

    target = convert_with_progress(source, output, dtype=dtype)
    from parrot_cli.paths import checkpoints_root

    console.print(f"Checkpoint written to [bold]{target}[/]")
    try:  # under the root a checkpoint is named by its org/name; elsewhere by its path
        selector = f"-m {target.resolve().relative_to(checkpoints_root().resolve())}"
    except ValueError:
        selector = f"--checkpoint-dir {target}"
    console.print(f'Run it: [bold]parrot generate "Hello" {selector}[/]', soft_wrap=True)


def convert_with_progress(
    source: str | Path, output: Path | None, *, dtype: str = "auto", source_label: str | None = None
) -> Path:
    """`checkpoint.convert.convert` under the conversion's progress bar (shared with `parrot download`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from parrot_cli.checkpoint.convert import convert as run_convert

    with Progress(
        TextColumn("[bold]Converting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.description}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # in a pipe or log rich would leave a blank line
    ) as progress:
        task = progress.add_task("", total=None)

        def update(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, description=name)

        return run_convert(source, output, dtype=dtype, progress=update, source_label=source_label)
