"""`parrot list` and `parrot rm`: the checkpoints on this machine (and, with --known, the
registry). The listing is the command's output, so it goes to stdout (a table, or --json for
scripts); questions and notices go to the stderr console."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from parrot_cli.cli.common import _complete_models, console
from parrot_cli.cli.download import Root

_PRECISIONS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def list_checkpoints(
    known: Annotated[bool, typer.Option("--known", help="List the registry's known models instead.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one list of objects) for scripts.")] = False,
    root: Root = None,
) -> None:
    """List the checkpoints on this machine: name, family, size, precision, context, chat template."""
    from parrot_cli.paths import checkpoints_root

    root = (root or checkpoints_root()).expanduser()
    rows = _known_rows(root) if known else [_describe(d, root) for d in find_checkpoints(root)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"No checkpoints under {root}; get one with `parrot download`.", soft_wrap=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    columns = (
        ("name", "aliases", "family", "parameters", "context", "sources", "downloaded")
        if known
        else ("name", "family", "parameters", "size", "precision", "context", "chat")
    )
    for column in columns:
        table.add_column(column, justify="right" if column in ("parameters", "size", "context") else "left",
                         no_wrap=column == "name")
    for row in rows:
        table.add_row(*(_cell(column, row) for column in columns))
    # The listing is the output: to stdout, never truncated in a pipe (rich assumes 80 columns).
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(out.width, 200))
    out.print(table)


def remove(
    name: Annotated[str, typer.Argument(help="Checkpoint name as `parrot list` shows it, an alias, or a path.",
                                        autocompletion=_complete_models)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    root: Root = None,
) -> None:
    """Delete a checkpoint (asks first)."""
    from parrot_cli.checkpoint.info import CONFIG_FILE
    from parrot_cli.config import find_known
    from parrot_cli.errors import ModelNotFoundError
    from parrot_cli.paths import checkpoints_root

    root = (root or checkpoints_root()).expanduser()
    known = find_known(name)
    candidates = [root / name, *([root / known.name] if known else []), Path(name).expanduser()]
    target = next((c for c in candidates if (c / CONFIG_FILE).is_file()), None)
    if target is None:  # never delete a directory that is not a parrot checkpoint
        raise ModelNotFoundError(f"No checkpoint named {name} under {root}; `parrot list` shows what there is.")
    size = _size(target)
    if not yes:
        try:
            # typer's confirm, not click's: typer >= 0.26 does not depend on click.
            confirmed = typer.confirm(f"Delete {target} ({_human_bytes(size)})?", default=False, err=True)
        except typer.Abort:  # end of input: the answer is no
            confirmed = False
        if not confirmed:
            console.print("Nothing deleted.")
            return
    for leftover in (target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(target)
    console.print(f"Deleted {target} ({_human_bytes(size)} freed).", soft_wrap=True)


# --------------------------------------------------------------------------- data


def find_checkpoints(root: Path) -> list[Path]:
    """Directories under `root` (up to ORG/NAME depth and one more) holding a parrot_config.json;
    half-written `.partial`/`.old` directories are not checkpoints."""
    from parrot_cli.checkpoint.info import CONFIG_FILE

    found = []
    for depth in ("*", "*/*", "*/*/*"):
        for config in root.glob(f"{depth}/{CONFIG_FILE}"):
            d = config.parent
            if not any(p.endswith((".partial", ".old")) for p in d.relative_to(root).parts):
                found.append(d)
    return sorted(found)


def _describe(d: Path, root: Path) -> dict[str, Any]:
    from parrot_cli.checkpoint.info import read_info, read_safetensors_header, weight_files
    from parrot_cli.config import human_count
    from parrot_cli.errors import ParrotError

    row: dict[str, Any] = {"name": d.relative_to(root).as_posix(), "path": str(d), "size_bytes": _size(d)}
    try:
        info = read_info(d)
        dtypes = set()
        for f in weight_files(d):
            header, _ = read_safetensors_header(f)
            dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    except ParrotError as err:
        return {**row, "error": str(err)}
    params = info.config.num_parameters()
    quantized_from = None
    if info.quantization:
        from parrot_cli.quantize.qconfig import QuantizationConfig

        stored = QuantizationConfig.from_dict(info.quantization)
        precision = stored.summary()
        if stored.method == "gguf":  # what each GGUF type became: "int4 (Q4_1->int4 g32 x120, ...)"
            quantized_from = stored.mapping()
            short = ", ".join(line.split(" (")[0].replace(" -> ", "->") for line in quantized_from)
            precision = f"{stored.mode} ({short})"
    else:
        floats = sorted(_PRECISIONS[t] for t in dtypes if t in _PRECISIONS)
        precision = "/".join(floats) or "/".join(sorted(dtypes))
    tokenizer_config = d / "tokenizer_config.json"
    try:
        chat = (d / "chat_template.jinja").is_file() or bool(
            json.loads(tokenizer_config.read_text()).get("chat_template")
        )
    except (OSError, ValueError, AttributeError):
        chat = False
    return {
        **row,
        "family": info.config.family,
        "parameters": params,
        "parameters_human": human_count(params),
        "precision": precision,
        **({"quantized_from": quantized_from} if quantized_from else {}),
        "context_length": info.config.block_size,
        "chat_template": chat,
        "source": info.provenance.get("source"),
    }


def _known_rows(root: Path) -> list[dict[str, Any]]:
    from parrot_cli.checkpoint.info import CONFIG_FILE
    from parrot_cli.config import KNOWN_MODELS, human_count

    rows = []
    for model in KNOWN_MODELS.values():
        config = model.config
        rows.append({
            "name": model.name,
            "aliases": list(model.aliases),
            "family": config.family,
            "parameters": config.num_parameters(),
            "parameters_human": human_count(config.num_parameters()),
            "context_length": config.block_size,
            "sources": [str(s) for s in model.sources] or [f"hub:{model.name}"],
            "downloaded": (root / model.name / CONFIG_FILE).is_file(),
        })
    return rows


def _cell(column: str, row: dict[str, Any]) -> str:
    if "error" in row and column not in ("name",):
        return "[red]unreadable[/]" if column == "family" else ""
    value = {
        "parameters": row.get("parameters_human"),
        "size": _human_bytes(row.get("size_bytes", 0)),
        "context": row.get("context_length"),
        "chat": "yes" if row.get("chat_template") else "no",
        "sources": ", ".join(s.split(":", 1)[0] for s in row.get("sources", [])),
        "aliases": ", ".join(row.get("aliases", [])),
        "downloaded": "yes" if row.get("downloaded") else "",
    }.get(column, row.get(column))
    return "" if value is None else str(value)


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
