"""`python -m parrot_cli` runs the `parrot` command."""

from parrot_cli.cli import main

if __name__ == "__main__":
    main()
