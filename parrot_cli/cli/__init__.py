"""The `parrot` command: one Typer app, commands registered in one place.

Command modules are thin: they parse options, call the library, render with rich. Heavy
imports (torch) happen inside the command bodies, so `parrot --help` and shell completion
answer instantly. `main()` is the one edge where library errors become one readable line
and an exit code (0 ok, 1 runtime error, 2 usage error, 130 interrupted).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import click
import typer

from parrot_cli import __version__
from parrot_cli.cli import bench, chat, convert, download, estimate, generate, manage
from parrot_cli.cli.common import print_error

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
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print_error("Interrupted.")
        sys.exit(130)
    except BaseException as err:  # the edge: everything else becomes one line
        if isinstance(err, SystemExit):
            raise
        sys.exit(print_error(err))
    if code == 130:
        print_error("Interrupted.")
    sys.exit(code if isinstance(code, int) else 0)
