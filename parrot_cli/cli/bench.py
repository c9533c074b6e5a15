"""`parrot bench`: llama-bench-style speed, memory and quality of each configuration.

Thin: parse the options (comma-separated values sweep), run `parrot_cli.bench`, render.
The result (table, JSON, CSV or markdown) goes to stdout; progress and notes to stderr.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from parrot_cli.cli.common import ModelOptions, console, model_choice, positive_int
from parrot_cli.cli.options import SWEEP_PANEL, Option, shared
from parrot_cli.errors import UsageError

OUTPUT = "Output"


@shared(sweep=True)
def bench(
    prompt_tokens: Annotated[
        str, typer.Option("--prompt-tokens", "-p", help="Prompt length (pp).", rich_help_panel=SWEEP_PANEL)
    ] = "512",
    gen_tokens: Annotated[
        str, typer.Option("--gen-tokens", "-n", help="Decode steps (tg), EOS ignored.", rich_help_panel=SWEEP_PANEL)
    ] = "128",
    repetitions: Annotated[
        int, typer.Option("--repetitions", "-r", help="Timed runs per configuration, after one warm-up.")
    ] = 5,
    ppl: Annotated[
        Path | None, typer.Option("--ppl", help="Also measure perplexity on this text file.")
    ] = None,
    vs: Annotated[
        list[str] | None,
        typer.Option("--vs", help="Also run the same weights in a peer: transformers or llama.cpp (repeatable)."),
    ] = None,
    bandwidth: Annotated[
        float | None,
        typer.Option(help="The machine's memory read bandwidth in GB/s (default: measured once)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON with every sample.", rich_help_panel=OUTPUT)] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV, one row per configuration.", rich_help_panel=OUTPUT)] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a markdown table.", rich_help_panel=OUTPUT)] = False,
    *,
    load: ModelOptions,
) -> None:
    """Measure load time, prompt and generation speed, time to first token, peak memory (of
    every rank), bandwidth use and perplexity; comma-separated values sweep every combination
    (e.g. --strategy none,tp,sequential --devices 2 compares one device with two)."""
    if as_json + as_csv + as_markdown > 1:
        raise UsageError("Choose at most one of --json, --csv and --markdown.")
    if repetitions < 1:
        raise UsageError("--repetitions must be at least 1.")
    count = Option("prompt_tokens", str, "", "", sweep=positive_int, sweep_what="a whole number >= 1")
    prompts = count.parse_sweep(prompt_tokens)
    gens = replace(count, name="gen_tokens").parse_sweep(gen_tokens)
    peers = [p.strip() for item in vs or [] for p in item.split(",")]
    ppl_text = _read_text(ppl) if ppl is not None else None

    from parrot_cli.bench import BenchRun, make_plan

    plan = make_plan(
        model_choice(load.checkpoint_dir, load.model),
        device=load.device or "auto",
        quantize=load.quantize,
        precision=load.precision,
        prompt_tokens=prompts,
        gen_tokens=gens,
        threads=load.threads,
        compile=[bool(c) for c in load.compile] if load.compile != [None] else [False],
        strategy=load.strategy,
        vs=list(dict.fromkeys(peers)),
        repetitions=repetitions,
        ppl_text=ppl_text,
        max_seq_length=load.max_seq_length,
        bandwidth_gbs=bandwidth,
        load_options={
            "group_size": load.group_size,
            "quantize_head": load.quantize_head,
            "devices": load.devices,
            "cpu_offload": load.cpu_offload,
            "dist_backend": load.dist_backend,
            "dist_timeout": load.dist_timeout,
        },
    )
    run = BenchRun(plan)
    interrupted = _run_with_progress(run)
    report = run.report(interrupted=interrupted)
    render = _json if as_json else _csv if as_csv else _markdown if as_markdown else _table
    render(report)
    failed = [r for r in report["results"] if r["error"]]
    if interrupted:
        raise typer.Exit(130)
    for result in run.results:
        if result.exception is not None:
            _debug_traceback(result.exception)
    if failed:
        console.print(
            f"[bold red]Error:[/] {len(failed)} of {len(report['results'])} configurations "
            "failed; see the error column."
        )
        raise typer.Exit(1)


# --------------------------------------------------------------------------- parsing


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--ppl {path} cannot be read as UTF-8 text ({type(err).__name__}).") from err
    if not text.strip():
        raise UsageError(f"--ppl {path} is empty; give a text of at least a few sentences.")
    return text


def _run_with_progress(run) -> bool:
    """Run every configuration under a progress bar; a finished one prints a line at once.
    Returns True when Ctrl-C stopped the run (what was measured is kept)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from parrot_cli.bench import result_row

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("starting", total=run.plan.steps)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        run.progress = progress
        try:
            for result in run.run():
                row = _cells(result_row(result, run.bandwidth.get("gbs")))
                status = f"[red]{result.error}[/]" if result.error else f"tg {row['tg t/s']}, pp {row['pp t/s']}"
                console.print(f"[dim]done:[/] {_label(result.config)}: {status}", soft_wrap=True)
        except KeyboardInterrupt:
            return True
    return False


def _label(config) -> str:
    from parrot_cli.bench import describe

    return describe(config)


def _debug_traceback(err: BaseException) -> None:
    import os
    import traceback

    if os.environ.get("PARROT_DEBUG", "") not in ("", "0"):
        traceback.print_exception(err, file=sys.stderr)


# --------------------------------------------------------------------------- rendering

KEYS = ("engine", "strategy", "quantize", "precision", "threads", "compile", "test")


def _fmt(fig: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if fig["mean"] is None:
        return "—"
    return f"{fig['mean'] * scale:.{digits}f} ± {fig['std'] * scale:.{digits}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GB' else 0}f} {unit}"
    return f"{n} B"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    """One result as display strings, column name -> cell."""
    share = f" ({row['bandwidth_share']:.0%})" if row["bandwidth_share"] is not None else ""
    cells = {
        "engine": row["engine"],
        "strategy": row["strategy"] or "none",
        "quantize": row["quantize"] or "none",
        "precision": row["precision"] or "—",
        "threads": str(row["threads"] or "—"),
        "compile": "on" if row["compile"] else "off",
        "test": row["test"],
        "load s": f"{row['load_s']:.2f}" if row["load_s"] is not None else "—",
        "pp t/s": _fmt(row["pp_tokens_per_s"]),
        "tg t/s": _fmt(row["tg_tokens_per_s"]),
        "TTFT ms": _fmt(row["time_to_first_token_s"], 1000),
        # The process peak, and what it rose above the memory held before loading; with a
        # strategy, every rank's peak (rank 0 is this process).
        "peak mem (+load)": " / ".join(_bytes(r["peak_memory_bytes"]) for r in row["rank_memory"])
        if row["rank_memory"] else _bytes(row["peak_memory_bytes"]) + (
            f" (+{_bytes(row['peak_memory_bytes'] - row['baseline_memory_bytes'])})"
            if row["peak_memory_bytes"] and row["baseline_memory_bytes"] else ""
        ),
        "weights": _bytes(row["weight_bytes"]),
        "GB/s (share)": _fmt(row["bandwidth_gbs"], digits=2) + share if row["bandwidth_gbs"]["mean"] else "—",
        "ppl": f"{row['perplexity']:.3f}" if row["perplexity"] is not None else "—",
    }
    for peer, ratio in row["vs"].items():
        parts = [f"{k} {ratio[k]:.2f}x" for k in ("tg", "pp", "perplexity") if ratio.get(k)]
        cells[f"vs {peer}"] = ", ".join(p.replace("perplexity", "ppl") for p in parts)
    if row["error"]:
        cells["error"] = row["error"]
    elif row["interrupted"]:
        cells["error"] = "interrupted (partial)"
    return cells


def _columns(report: dict[str, Any]) -> tuple[list[str], list[dict[str, str]], str]:
    """Column names, rows of cells, and a caption that holds the key columns whose value
    is the same in every row (so the table shows only what varies)."""
    rows = [_cells(r) for r in report["results"]]
    names: list[str] = []
    for cells in rows:
        names += [n for n in cells if n not in names]
    constant = [k for k in KEYS if len({cells[k] for cells in rows}) == 1] if len(rows) > 1 else []
    shown = [n for n in names if n not in constant]
    env, bw = report["environment"], report["machine_bandwidth"]
    runs = report["settings"]["repetitions"]
    fixed = ", ".join(f"{k} {rows[0][k]}" for k in constant)
    device = env.get("gpu") or f"{env.get('cpu')} ({env.get('cpu_count')} cores)"
    caption = (
        f"{report['model'].get('name')} on {device}; torch {env.get('torch')}, parrot {env.get('parrot')}"
        f" ({env.get('git_revision') or 'no git'}); {runs} run{'s' * (runs != 1)} after "
        f"{report['settings']['warmup']} warm-up, mean ± std; machine read bandwidth "
        f"{bw.get('gbs', 0):.1f} GB/s ({bw.get('source')})" + (f"; {fixed}" if fixed else "")
    )
    if report["interrupted"]:
        caption += "; INTERRUPTED: partial results"
    return shown, rows, caption


def _table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    names, rows, caption = _columns(report)
    table = Table(caption=caption, caption_justify="left", min_width=None)
    for name in names:
        table.add_column(name, justify="left" if name in KEYS or name == "error" else "right")
    for cells in rows:
        table.add_row(*(cells.get(n, "") for n in names))
    # Piped, the table keeps its natural width instead of folding at 80 columns.
    Console(highlight=False, width=None if sys.stdout.isatty() else 1000).print(table)


def _markdown(report: dict[str, Any]) -> None:
    names, rows, caption = _columns(report)
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    lines += ["| " + " | ".join(cells.get(n, "") for n in names) + " |" for cells in rows]
    sys.stdout.write("\n".join(lines) + f"\n\n{caption}\n")


def _json(report: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


def _csv(report: dict[str, Any]) -> None:
    figures = ("pp_tokens_per_s", "tg_tokens_per_s", "time_to_first_token_s", "bandwidth_gbs")
    scalars = ("load_s", "peak_memory_bytes", "weight_bytes", "bytes_per_token",
               "bandwidth_share", "perplexity")
    peers = sorted({p for r in report["results"] for p in r["vs"]})
    header = [*KEYS[:-1], "prompt_tokens", "gen_tokens", *scalars]
    header += [f"{f}_{s}" for f in figures for s in ("mean", "std")]
    header += [f"vs_{p}_{k}" for p in peers for k in ("tg", "pp", "perplexity")] + ["error"]
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    for r in report["results"]:
        row = [r[k] for k in (*KEYS[:-1], "prompt_tokens", "gen_tokens", *scalars)]
        row += [r[f][s] for f in figures for s in ("mean", "std")]
        row += [r["vs"].get(p, {}).get(k) for p in peers for k in ("tg", "pp", "perplexity")]
        writer.writerow([*row, r["error"] or ""])
