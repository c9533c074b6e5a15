"""`parrot quantize METHOD`: write a quantized checkpoint from a float one.

One Typer sub-app; each method is one command. `int4` and `int8` (round to nearest)
hand `run` a function writing the checkpoint; `run` owns picking the float checkpoint,
the progress bar, the summary (sizes, time, the command that runs the result) and clean
interruption (Ctrl-C or kill: exit 130, and the `.partial/` directory removed, so no half
checkpoint remains). `gptq` (calibrated, `quantize/gptq_checkpoint.py`) has a progress
bar of its own: it works block by block, with an ETA, and one line per block in a log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from parrot_cli.cli.common import (
    CheckpointDir,
    Device,
    ModelName,
    Precision,
    Threads,
    console,
    model_choice,
)

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


GPTQ_PANEL = "GPTQ"
CALIBRATION_PANEL = "Calibration"


@app.command("gptq")
def gptq(
    checkpoint_dir: CheckpointDir = None,
    model: ModelName = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Directory to write (default: a sibling of the source named "
                     "after it and the settings, e.g. NAME-gptq-int4-g128)."),
    ] = None,
    group_size: Annotated[
        int, typer.Option(help="Inputs sharing one scale and zero point: 32, 64, 128 or 256 dividing every "
                          "layer's input size, or -1 for one group per output row.", rich_help_panel=GPTQ_PANEL),
    ] = 128,
    act_order: Annotated[
        bool, typer.Option("--act-order", help="Quantize inputs by decreasing activation energy (better "
                           "quality; served by permuting the inputs, at the same speed).",
                           rich_help_panel=GPTQ_PANEL),
    ] = False,
    sym: Annotated[
        bool | None, typer.Option("--sym/--asym", help="Symmetric (zero point 8) or asymmetric zero points "
                                  "[dim]\\[default: asym; sym with --format hf][/]", rich_help_panel=GPTQ_PANEL,
                                  show_default=False),
    ] = None,
    damp: Annotated[
        float, typer.Option(help="Damping added to the Hessian's diagonal, relative to its mean (raised "
                            "automatically when a layer needs more).", rich_help_panel=GPTQ_PANEL),
    ] = 0.01,
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration text: a plain text file, or JSON Lines (.jsonl) with a "
                                  "\"text\" field (default: the Python standard library's documentation, "
                                  "offline).", rich_help_panel=CALIBRATION_PANEL),
    ] = None,
    samples: Annotated[
        int, typer.Option(help="Calibration windows.", rich_help_panel=CALIBRATION_PANEL)
    ] = 128,
    seq_len: Annotated[
        int, typer.Option(help="Tokens per calibration window.", rich_help_panel=CALIBRATION_PANEL)
    ] = 512,
    fmt: Annotated[
        str, typer.Option("--format", help="parrot (a parrot checkpoint) or hf (a Hugging Face GPTQ "
                          "directory for transformers, gptqmodel, vLLM).")
    ] = "parrot",
    device: Device = None,
    precision: Precision = None,
    threads: Threads = None,
) -> None:
    """Quantize to 4 bits with GPTQ (calibrated; a gptq.int4 checkpoint, or Hugging Face GPTQ).

    Each block is calibrated on the outputs of the quantized blocks before it, and each
    layer's rounding error is compensated by the inputs not yet quantized."""
    from parrot_cli.checkpoint.locate import locate
    from parrot_cli.quantize.gptq_checkpoint import describe_outcome, quantize_gptq
    from parrot_cli.quantize.gptq_model import GPTQSettings

    source = locate(model_choice(checkpoint_dir, model))
    if threads:
        import torch

        torch.set_num_threads(threads)
    fmt = fmt.strip().lower()
    symmetric = (fmt == "hf") if sym is None else sym
    # Asymmetric zero points in a Hugging Face (v1) file are stored minus one: keep them >= 1.
    settings = GPTQSettings(group_size=group_size, sym=symmetric, act_order=act_order, damp=damp,
                            min_zero=1 if fmt == "hf" and not symmetric else 0)
    from parrot_cli.cli.common import terminate_as_interrupt

    with terminate_as_interrupt(), _ProgressBar() as bar:  # a kill cleans up like Ctrl-C
        outcome = quantize_gptq(
            source, output=output, settings=settings, calibration=calibration, samples=samples,
            seq_len=seq_len, fmt=fmt, device=device or "auto", precision=precision,
            progress=bar.update, notify=bar.note,
        )
    console.print(describe_outcome(outcome), soft_wrap=True)
    console.print(f"Checkpoint written to [bold]{outcome.target}[/]", soft_wrap=True)
    if fmt == "hf":
        console.print(f"Import it into parrot with [bold]parrot convert {outcome.target}[/]", soft_wrap=True)
    else:
        console.print(f'Run it: [bold]parrot generate "Hello" --checkpoint-dir {outcome.target}[/]', soft_wrap=True)


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
    from parrot_cli.checkpoint.locate import locate
    from parrot_cli.cli.common import step_progress, terminate_as_interrupt

    source = locate(model)
    with terminate_as_interrupt(), step_progress("Quantizing") as update:
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


class _ProgressBar:
    """A rich bar over the blocks with an ETA on a terminal; elsewhere (a pipe, a log) one
    line per finished block."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]GPTQ"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.description}"),
            console=console,
            transient=True,
            disable=not self.live,
        )
        self.task = None
        self.start = time.perf_counter()
        self.blocks_done = 0

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        self.task = self.progress.add_task("calibrating", total=None)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, done: float, total: int, what: str) -> None:
        self.progress.update(self.task, completed=done, total=total, description=what)
        if not self.live and int(done) > self.blocks_done:
            self.blocks_done = int(done)
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (total - done)
            console.print(f"[dim]GPTQ block {self.blocks_done}/{total} done ({elapsed:.0f} s, ETA {eta:.0f} s)[/]")

    def note(self, message: str) -> None:
        console.print(f"[dim]{message}[/]", soft_wrap=True)
