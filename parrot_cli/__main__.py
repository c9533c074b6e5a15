"""`python -m parrot_cli` (and the installed `parrot` script) runs the `parrot` command.

The CLI module is imported inside `run` so that a Ctrl-C while Python is still importing
it exits with 130 like any other interruption, instead of printing a traceback.
"""

import sys


def run() -> None:
    try:
        from parrot_cli.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("Error: Interrupted.\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
