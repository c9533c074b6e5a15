"""The `parrot` command: one Typer app, commands registered in one place.

Command modules are thin: they parse options, call the library, render with rich. Heavy
imports (torch) happen inside the command bodies, so `parrot --help` and shell completion
answer instantly. `main()` is the one edge where library errors become one readable line
and an exit code (0 ok, 1 runtime error, 2 usage error, 130 interrupted).
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from typing import Annotated

import typer

from parrot_cli import __version__
from parrot_cli.cli import bench, chat, convert, download, estimate, generate, manage, quantize
from parrot_cli.cli.common import print_error
from parrot_cli.errors import ParrotError, UsageError

app = typer.Typer(
    name="parrot",
    help="Download, convert, quantize, benchmark and run large language models locally.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The command table: one line per subcommand.
app.command("bench")(bench.bench)
app.command("convert")(convert.convert)
app.command("generate")(generate.generate)
app.command("chat")(chat.chat)
app.command("download")(download.download)
app.command("estimate")(estimate.estimate)
app.command("list")(manage.list_checkpoints)
app.command("rm")(manage.remove)
app.add_typer(quantize.app, name="quantize")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"parrot {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks on errors (or PARROT_DEBUG=1).")
    ] = False,
) -> None:
    if debug:
        os.environ["PARROT_DEBUG"] = "1"


def main(argv: list[str] | None = None) -> None:
    # A process started from a background job inherits "ignore SIGINT"; restore Python's
    # handler so Ctrl-C always reaches us as KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    command = typer.main.get_command(app)
    try:
        # Outside standalone mode Typer returns the exit code of an Exit (Ctrl-C -> 130).
        code = command.main(args=argv, prog_name="parrot", standalone_mode=False)
    except typer.Exit as exit_:  # typer.Exit/Abort are the parsing click's own, on every typer
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        print_error("Interrupted.")
        sys.exit(130)
    except BaseException as err:  # the edge: everything else becomes one line
        if isinstance(err, SystemExit):
            raise
        if isinstance(err, click_exceptions()):
            sys.exit(show_click_error(err))
        sys.exit(print_error(err))
    if code == 130:
        print_error("Interrupted.")
    sys.exit(code if isinstance(code, int) else 0)


def click_exceptions() -> tuple[type[Exception], ...]:
    """`ClickException` of every click that may parse the command line.

    typer < 0.26 parses with click itself; typer >= 0.26 with its own copy, `typer._click`,
    and click itself may not be installed at all. Catching both keeps usage errors the same
    on every typer that pyproject allows. Imported only on the error path.
    """
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except ImportError:
            continue
    return tuple(found)


def show_click_error(err: Exception) -> int:
    """Print a click error as parrot's one line and return its exit code (2 for usage errors).

    click's own message names the option and the problem ("Invalid value for '--temperature':
    'hot' is not a valid float."); it is kept, and click's three-line usage block becomes a
    pointer to the command's --help.
    """
    exit_code = getattr(err, "exit_code", 1)
    if type(err).__name__ == "NoArgsIsHelpError":  # bare `parrot`: the help is the message
        text = err.format_message()  # empty when typer's rich help has printed itself
        if text.strip():
            typer.echo(text, err=True)
        return exit_code
    message = " ".join(err.format_message().split())  # one line, whatever click wrapped
    # typer 0.25 with click >= 8.3 both append "Did you mean 'generate'?": say it once.
    message = " ".join(dict.fromkeys(re.split(r"(?<=[.?!]) ", message)))
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        end = "" if message.endswith((".", "?", "!")) else "."
        message = f"{message}{end} See `{ctx.command_path} --help`."
    return print_error(UsageError(message) if exit_code == 2 else ParrotError(message))
