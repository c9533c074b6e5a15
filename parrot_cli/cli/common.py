"""What every command shares: the model-selection options, the stderr console, and the
translation of exceptions into one readable line."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.markup import escape

from parrot_cli.errors import ParrotError, UsageError
from parrot_cli.settings import PRECISIONS, SETTINGS

# Everything that is not generated text goes to stderr.
console = Console(stderr=True, highlight=False)


def print_error(err: BaseException | str) -> int:
    """Print one line for `err` (a traceback too with --debug/PARROT_DEBUG); return the exit code."""
    debug = os.environ.get("PARROT_DEBUG", "") not in ("", "0")
    if isinstance(err, str):
        console.print(f"[bold red]Error:[/] {escape(err)}", markup=True, soft_wrap=True)
        return 1
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    code = 1
    if isinstance(err, ParrotError):
        message, code = str(err), err.exit_code
    elif _is_oom(err):
        message = "Out of memory; try a smaller model, --quantize, or a shorter --max-seq-length."
    elif isinstance(err, OSError) and err.strerror:
        message = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        message = f"Unexpected error ({type(err).__name__}: {err})." + (
            "" if debug else " Run with --debug for details."
        )
    console.print(f"[bold red]Error:[/] {escape(message)}", markup=True, soft_wrap=True, highlight=False)
    return code


def _is_oom(err: BaseException) -> bool:
    from parrot_cli.errors import is_out_of_memory

    return is_out_of_memory(err)


def _complete_models(incomplete: str) -> list[str]:
    from parrot_cli.config import KNOWN_MODELS

    names = [n for m in KNOWN_MODELS.values() for n in (m.name, *m.aliases)]
    return [n for n in names if n.startswith(incomplete)]


def _complete_precision(incomplete: str) -> list[str]:
    return [p for p in PRECISIONS if p.startswith(incomplete)]


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in ("auto", "cpu", "cuda", "mps") if d.startswith(incomplete)]


def help_of(name: str) -> str:
    """Help text for a setting, with its built-in default (declared once, in settings)."""
    setting = SETTINGS[name]
    if setting.default is None or setting.default is False:
        return setting.help
    return f"{setting.help} [dim]\\[default: {setting.default}][/]"


CheckpointDir = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", help="Checkpoint directory to load.", rich_help_panel="Model"),
]
ModelName = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="Model name, alias or path (default: the configured default model).",
        autocompletion=_complete_models,
        rich_help_panel="Model",
    ),
]
Precision = Annotated[
    str | None,
    typer.Option(help=help_of("precision"), autocompletion=_complete_precision, rich_help_panel="Model"),
]
Device = Annotated[
    str | None,
    typer.Option(help=help_of("device"), autocompletion=_complete_device, rich_help_panel="Model"),
]
Threads = Annotated[int | None, typer.Option(help=help_of("threads"), rich_help_panel="Model")]
Compile = Annotated[
    bool | None, typer.Option("--compile/--no-compile", help=help_of("compile"), rich_help_panel="Model")
]
MaxSeqLength = Annotated[int | None, typer.Option(help=help_of("max_seq_length"), rich_help_panel="Model")]


def _complete_quantize(incomplete: str) -> list[str]:
    from parrot_cli.quantize import ALIASES, MODES

    return [m for m in ("none", *MODES, *ALIASES) if m.startswith(incomplete)]


QUANTIZED_WHAT = (
    "Every Linear of the transformer blocks is quantized; embeddings and norms stay in the "
    "working precision, and so does lm_head unless --quantize-head. int8/int4 compute in bf16."
)
Quantize = Annotated[
    str | None,
    typer.Option(
        help=f"{help_of('quantize')} {QUANTIZED_WHAT}",
        autocompletion=_complete_quantize,
        rich_help_panel="Model",
    ),
]
GroupSize = Annotated[int | None, typer.Option(help=help_of("group_size"), rich_help_panel="Model")]
QuantizeHead = Annotated[
    bool | None,
    typer.Option("--quantize-head/--no-quantize-head", help=help_of("quantize_head"), rich_help_panel="Model"),
]

# Sampling options, shared by every command that generates (defaults from settings.SETTINGS).
SAMPLING_PANEL = "Sampling"
MaxNewTokens = Annotated[int | None, typer.Option(help=help_of("max_new_tokens"), rich_help_panel=SAMPLING_PANEL)]
Temperature = Annotated[float | None, typer.Option(help=help_of("temperature"), rich_help_panel=SAMPLING_PANEL)]
TopK = Annotated[int | None, typer.Option(help=help_of("top_k"), rich_help_panel=SAMPLING_PANEL)]
TopP = Annotated[float | None, typer.Option(help=help_of("top_p"), rich_help_panel=SAMPLING_PANEL)]
MinP = Annotated[float | None, typer.Option(help=help_of("min_p"), rich_help_panel=SAMPLING_PANEL)]
RepetitionPenalty = Annotated[
    float | None, typer.Option(help=help_of("repetition_penalty"), rich_help_panel=SAMPLING_PANEL)
]
Seed = Annotated[int | None, typer.Option(help=help_of("seed"), rich_help_panel=SAMPLING_PANEL)]


def model_choice(checkpoint_dir: Path | None, model: str | None) -> str | None:
    """--checkpoint-dir and --model name the same thing; both at once is a usage error."""
    if checkpoint_dir is not None and model is not None:
        raise UsageError("Give --checkpoint-dir or --model, not both.")
    return str(checkpoint_dir) if checkpoint_dir is not None else model


def load_llm(**kwargs: Any):
    """LLM.load with notices printed dimmed on stderr (torch is imported here, not before)."""
    from parrot_cli.api import LLM

    with console.status("Loading model…", spinner="dots"):
        llm = LLM.load(**kwargs)
    llm.notify = lambda message: console.print(f"[dim]{message}[/]")
    return llm


def utf8_stdout() -> TextIO:
    """stdout that writes UTF-8 whatever the locale says (model text is Unicode)."""
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout
