"""`parrot quantize METHOD`: write a quantized checkpoint from a float one.

One Typer sub-app; each method is one command (`int4`, `int8`; `gptq` drops in the same
way) that parses its own options and hands `run` a function writing the checkpoint. `run`
owns what every method shares: picking the float checkpoint, the progress bar, the
summary (sizes, time, the command that runs the result) and clean interruption (Ctrl-C or
kill: exit 130, and the `.partial/` directory removed, so no half checkpoint remains).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from parrot_cli.cli.common import CheckpointDir, ModelName, console, model_choice

if TYPE_CHECKING:
    from parrot_cli.checkpoint.store import Progress
    from parrot_cli.quantize.save import QuantizeResult

app = typer.Typer(
    help="Write a quantized checkpoint from a float one; it loads with no flag, already small.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

Output = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o",
        help="Checkpoint directory to write (default: a sibling of the source named after the settings, e.g. NAME-int4-g64).",
    ),
]
QuantizeHead = Annotated[
    bool,
    typer.Option("--quantize-head/--no-quantize-head", help="Quantize the output head too (it stays in the source's float dtype otherwise)."),
]


@app.command("int4")
def int4(
    checkpoint_dir: CheckpointDir = None,
    model: ModelName = None,
    group_size: Annotated[
        int | None,
        typer.Option(help="Inputs per scale and zero: 32, 64, 128 or 256 (default: the largest of 128/64/32 dividing every layer; 32 for weights from a 4-bit GGUF)."),
    ] = None,
    quantize_head: QuantizeHead = False,
    output: Output = None,
) -> None:
    """int4 weights with a bf16 scale and zero per group (round to nearest), as `--quantize int4`."""
    _rtn("int4", checkpoint_dir, model, group_size, quantize_head, output)


@app.command("int8")
def int8(
    checkpoint_dir: CheckpointDir = None,
    model: ModelName = None,
    quantize_head: QuantizeHead = False,
    output: Output = None,
) -> None:
    """int8 weights with one bf16 scale per output channel, as `--quantize int8`."""
    _rtn("int8", checkpoint_dir, model, None, quantize_head, output)


def _rtn(mode: str, checkpoint_dir: Path | None, model: str | None, group_size: int | None,
         quantize_head: bool, output: Path | None) -> None:
    from parrot_cli.quantize.save import quantize_checkpoint

    def write(source: Path, progress: Progress) -> QuantizeResult:
        return quantize_checkpoint(source, mode, group_size=group_size, quantize_head=quantize_head,
                                   output=output, progress=progress)

    run(model_choice(checkpoint_dir, model), write)


def run(model: str | None, write: Callable[[Path, Progress], QuantizeResult]) -> QuantizeResult:
    """Locate the float checkpoint `model` (a path, name or None for the default), call
    `write(source_dir, progress)` under a progress bar, print the summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from parrot_cli.checkpoint.locate import locate
    from parrot_cli.cli.common import terminate_as_interrupt

    source = locate(model)
    with terminate_as_interrupt(), Progress(
        TextColumn("[bold]Quantizing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("[dim]{task.description}"),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        result = write(source, update)
    _summary(result)
    return result


def _summary(result: QuantizeResult) -> None:
    from parrot_cli.cli.convert import run_hint
    from parrot_cli.cli.manage import _human_bytes

    ratio = result.source_bytes / max(result.target_bytes, 1)
    console.print(
        f"Wrote [bold]{result.target}[/] ({result.config.summary()}): weights "
        f"{_human_bytes(result.source_bytes)} -> {_human_bytes(result.target_bytes)} "
        f"({ratio:.1f}x smaller) in {result.seconds:.1f} s.",
        soft_wrap=True,
    )
    console.print(run_hint(result.target), soft_wrap=True)
