"""What every command shares: the model-selection options, the stderr console, and the
translation of exceptions into one readable line."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from parrot_cli.cli.options import Option, group
from parrot_cli.errors import ParrotError, UsageError
from parrot_cli.settings import PRECISIONS, SETTINGS

# Everything that is not generated text goes to stderr.
console = Console(stderr=True, highlight=False)


SECONDARY_RANK_GRACE_S = 2.0


def print_error(err: BaseException | str) -> int:
    """Print one line for `err` (a traceback too with --debug/PARROT_DEBUG); return the exit code."""
    debug = os.environ.get("PARROT_DEBUG", "") not in ("", "0")
    if isinstance(err, str):
        console.print(f"[bold red]Error:[/] {escape(err)}", markup=True, soft_wrap=True)
        return 1
    if debug:
        traceback.print_exception(err, file=sys.stderr)
    code = 1
    from parrot_cli.distributed.layout import is_secondary_rank, torchrun_launch

    if is_secondary_rank():  # a torchrun rank: rank 0 reports what every rank sees alike
        if isinstance(err, UsageError) or getattr(err, "quiet", False):
            # Every rank found the same mistake at once; leave a moment after rank 0, or
            # torchrun sees this rank fail first and stops rank 0 before it says why (seen
            # on a loaded machine: no message at all).
            time.sleep(SECONDARY_RANK_GRACE_S)
            return err.exit_code
        console.print(f"[bold red]Error:[/] rank {torchrun_launch().rank}: {escape(str(err))}", soft_wrap=True)
        return err.exit_code if isinstance(err, ParrotError) else 1
    if isinstance(err, ParrotError):
        message, code = str(err), err.exit_code
    elif _is_oom(err):
        message = "Out of memory; try a smaller model, --quantize, or a shorter --max-seq-length."
    elif _is_disk_full(err):  # outside a checkpoint writer (which says more): where, and how much is free
        message = _disk_full_message(err)
    elif isinstance(err, OSError) and err.strerror:
        message = f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    else:
        message = f"Unexpected error ({type(err).__name__}: {err})." + (
            "" if debug else " Run with --debug for details."
        )
    console.print(f"[bold red]Error:[/] {escape(message)}", markup=True, soft_wrap=True, highlight=False)
    return code


def _is_disk_full(err: BaseException) -> bool:
    from parrot_cli.resources import is_disk_full

    return is_disk_full(err)


def _disk_full_message(err: OSError) -> str:
    from parrot_cli.resources import disk_free, human_bytes, mount_of

    where = Path(err.filename) if err.filename else Path.cwd()
    while not where.exists() and where != where.parent:
        where = where.parent
    return (
        f"The disk filled up ({err.strerror}{f': {err.filename}' if err.filename else ''}); "
        f"{mount_of(where)} has {human_bytes(disk_free(where))} free. Free some space and run the command again."
    )


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


def _complete_quantize(incomplete: str) -> list[str]:
    from parrot_cli.quantize import ALIASES, MODES

    return [m for m in ("none", *MODES, *ALIASES) if m.startswith(incomplete)]


def _complete_strategy(incomplete: str) -> list[str]:
    return [s for s in ("none", "tp", "sequential", "fsdp") if s.startswith(incomplete)]


def _complete_backend(incomplete: str) -> list[str]:
    return [b for b in ("auto", "gloo", "nccl") if b.startswith(incomplete)]


def positive_int(item: str) -> int:
    """A sweep item that must be a whole number >= 1."""
    value = int(item)
    if value < 1:
        raise ValueError(item)
    return value


def _precision(item: str) -> str:
    if item not in PRECISIONS:
        raise ValueError(item)
    return item


def _strategy(item: str) -> str:
    from parrot_cli.distributed.layout import resolve_strategy

    return resolve_strategy(item) or "none"


QUANTIZED_WHAT = (
    "Every Linear of the transformer blocks is quantized; embeddings and norms stay in the "
    "working precision, and so does lm_head unless --quantize-head. int8/int4 compute in bf16. "
    "A quantized checkpoint (a GGUF import, `parrot quantize`) loads as stored, with no flag."
)
MODEL_PANEL, DEVICES_PANEL, SAMPLING_PANEL = "Model", "Multi-device", "Sampling"

# The options of every command that loads a model (generate, chat, bench), declared once.
# Defaults and help come from settings.SETTINGS; a value left out resolves there.
MODEL_OPTIONS = (
    Option("checkpoint_dir", Path | None, "Checkpoint directory to load.", MODEL_PANEL, ("--checkpoint-dir",)),
    Option("model", str | None, "Model name, alias or path (default: the configured default model).",
           MODEL_PANEL, ("--model", "-m"), _complete_models),
    Option("precision", str | None, help_of("precision"), MODEL_PANEL, complete=_complete_precision,
           sweep=_precision, sweep_what=f"one of {', '.join(PRECISIONS)}"),
    Option("device", str | None, help_of("device"), MODEL_PANEL, complete=_complete_device),
    Option("threads", int | None, help_of("threads"), MODEL_PANEL, sweep=positive_int,
           sweep_what="a whole number >= 1"),
    Option("compile", bool | None, help_of("compile"), MODEL_PANEL, ("--compile/--no-compile",),
           sweep=SETTINGS["compile"].parse, sweep_what="on or off"),
    Option("max_seq_length", int | None, help_of("max_seq_length"), MODEL_PANEL),
    Option("quantize", str | None, f"{help_of('quantize')} {QUANTIZED_WHAT}", MODEL_PANEL,
           complete=_complete_quantize, sweep=str, sweep_what="a quantize mode"),
    Option("group_size", int | None, help_of("group_size"), MODEL_PANEL),
    Option("quantize_head", bool | None, help_of("quantize_head"), MODEL_PANEL, ("--quantize-head/--no-quantize-head",)),
    Option("strategy", str | None, help_of("strategy"), DEVICES_PANEL, complete=_complete_strategy,
           sweep=_strategy, sweep_what="none, tp, sequential or fsdp"),
    Option("devices", int | None, help_of("devices"), DEVICES_PANEL),
    Option("cpu_offload", bool | None, help_of("cpu_offload"), DEVICES_PANEL, ("--cpu-offload/--no-cpu-offload",)),
    Option("dist_backend", str | None, help_of("dist_backend"), DEVICES_PANEL, complete=_complete_backend),
    Option("dist_timeout", float | None, help_of("dist_timeout"), DEVICES_PANEL),
)

# The sampling options of every command that generates (generate, chat), declared once.
SAMPLING_OPTIONS = tuple(
    Option(name, kind, help_of(name), SAMPLING_PANEL)
    for name, kind in (
        ("max_new_tokens", int | None),
        ("temperature", float | None),
        ("top_k", int | None),
        ("top_p", float | None),
        ("min_p", float | None),
        ("repetition_penalty", float | None),
        ("seed", int | None),
    )
)


@group(*MODEL_OPTIONS)
@dataclass
class ModelOptions:
    """Which model to load and how (a command parameter of this type receives them)."""

    checkpoint_dir: Any
    model: Any
    precision: Any
    device: Any
    threads: Any
    compile: Any
    max_seq_length: Any
    quantize: Any
    group_size: Any
    quantize_head: Any
    strategy: Any
    devices: Any
    cpu_offload: Any
    dist_backend: Any
    dist_timeout: Any

    def load_kwargs(self) -> dict[str, Any]:
        """The keywords of `LLM.load` (unset values resolve in the settings)."""
        return {
            "model": model_choice(self.checkpoint_dir, self.model),
            "device": self.device or "auto",
            "precision": self.precision,
            "max_seq_length": self.max_seq_length,
            "compile": bool(self.compile),
            "threads": self.threads,
            "quantize": self.quantize,
            "group_size": self.group_size,
            "quantize_head": self.quantize_head,
            "strategy": self.strategy,
            "devices": self.devices,
            "cpu_offload": self.cpu_offload,
            "dist_backend": self.dist_backend,
            "dist_timeout": self.dist_timeout,
        }


@group(*SAMPLING_OPTIONS)
@dataclass
class SamplingOptions:
    """How to sample (a command parameter of this type receives them)."""

    max_new_tokens: Any
    temperature: Any
    top_k: Any
    top_p: Any
    min_p: Any
    repetition_penalty: Any
    seed: Any

    def values(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


_BY_NAME = {o.name: o for o in MODEL_OPTIONS + SAMPLING_OPTIONS}
# Single options as Annotated types, for a command that takes one without the group.
CheckpointDir = _BY_NAME["checkpoint_dir"].annotated()
ModelName = _BY_NAME["model"].annotated()
Device = _BY_NAME["device"].annotated()
Precision = _BY_NAME["precision"].annotated()
Threads = _BY_NAME["threads"].annotated()
MaxSeqLength = _BY_NAME["max_seq_length"].annotated()


def model_choice(checkpoint_dir: Path | None, model: str | None) -> str | None:
    """--checkpoint-dir and --model name the same thing; both at once is a usage error."""
    if checkpoint_dir is not None and model is not None:
        raise UsageError("Give --checkpoint-dir or --model, not both.")
    return str(checkpoint_dir) if checkpoint_dir is not None else model


def load_llm(**kwargs: Any):
    """LLM.load with notices printed dimmed on stderr (torch is imported here, not before)."""
    from parrot_cli.api import LLM
    from parrot_cli.distributed.layout import is_secondary_rank

    if is_secondary_rank():
        return LLM.load(**kwargs)  # serves rank 0, then ends the process
    with console.status("Loading model…", spinner="dots"):
        llm = LLM.load(**kwargs)
    llm.notify = lambda message: console.print(f"[dim]{message}[/]")
    for note in llm.notes:
        llm.notify(note)
    return llm


@contextlib.contextmanager
def step_progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    """A bar over the steps of a checkpoint being written (convert, download, quantize):
    yields `update(done, total, what)`. Transient, and off outside a terminal (in a pipe or
    a log rich would leave a blank line)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(f"[bold]{label}"),
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

        yield update


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (`kill`) like Ctrl-C while a checkpoint is written: the writer's
    cleanup runs (its `.partial/` directory is removed) and the command exits 130, where
    the default action would end the process on the spot and leave the directory behind."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding application): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def utf8_stdout() -> TextIO:
    """stdout that writes UTF-8 whatever the locale says (model text is Unicode)."""
    if (sys.stdout.encoding or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")
    return sys.stdout


def memory_line(llm) -> str:
    """Peak memory and weights: of this process, or of every rank of a multi-device model."""
    ranks = llm.memory_by_rank()
    kind = weights_kind(llm)
    if len(ranks) == 1:
        r = ranks[0]
        return f"{r['peak_memory_bytes'] / 1e9:.02f} GB (weights {r['weight_bytes'] / 1e9:.02f} GB, {kind})"
    each = ", ".join(
        f"rank {r['rank']} {r['peak_memory_bytes'] / 1e9:.02f} GB (weights {r['weight_bytes'] / 1e9:.02f})"
        for r in ranks
    )
    return f"{each}; {kind}, {llm.layout.describe()}"


def weights_kind(llm) -> str:
    """What the weight memory holds: the quantization mode, or the working precision."""
    if llm.stored_quantization is not None:
        return llm.stored_quantization.summary()
    return llm.quantization.describe() if llm.quantization else llm.precision
