"""Options declared once, shared by several commands.

Typer reads a command's options from its signature, so a group of options several
commands share would otherwise be spelled out in each signature (and drift). Here an
option is declared once as an `Option`; `shared(GROUP, ...)` adds a group's options to a
command's signature and hands their values to the command as one object per group: the
command declares a parameter annotated with the group's class and receives an instance.

`shared(..., sweep=True)` is the variant for `parrot bench`: the options that can sweep
take comma-separated values and arrive as lists (each item parsed and checked).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any

import typer

from parrot_cli.errors import UsageError

SWEEP_PANEL = "Sweep (comma-separated values: every combination runs)"


@dataclass(frozen=True)
class Option:
    """One command-line option: its parameter name (also its settings name), type, flags,
    help, help panel, completion, and how one value of a bench sweep is parsed."""

    name: str
    type: Any
    help: str
    panel: str
    decls: tuple[str, ...] = ()  # Typer declarations, e.g. ("--model", "-m"); default --name
    complete: Callable[[str], list[str]] | None = None
    sweep: Callable[[str], Any] | None = None  # None: this option never sweeps
    sweep_what: str = "a valid value"  # for the error naming a bad sweep item

    def annotated(self, sweep: bool = False) -> Any:
        """The Annotated type Typer reads for this option (sweep: a comma-separated str)."""
        decls = self.decls
        kind, help_text, panel = self.type, self.help, self.panel
        if sweep and self.sweep is not None:
            decls = tuple(d.split("/")[0] for d in decls)  # a --flag/--no-flag takes values
            kind, help_text, panel = str | None, f"{self.help} Comma-separated values sweep.", SWEEP_PANEL
        option = typer.Option(*decls, help=help_text, rich_help_panel=panel, autocompletion=self.complete)
        return Annotated[kind, option]

    def parse_sweep(self, text: str | None) -> list[Any]:
        """'a,b,c' -> parsed values in order, duplicates dropped; no option -> [None] (the
        setting resolves as usual). A bad item is one usage error sentence."""
        flag = "--" + self.name.replace("_", "-")
        if text is None:
            return [None]
        values: list[Any] = []
        for item in (i.strip() for i in text.split(",")):
            if not item:
                raise UsageError(f"{flag} {text!r} has an empty value; separate values with single commas.")
            try:
                value = self.sweep(item)
            except (TypeError, ValueError, UsageError):
                raise UsageError(f"{flag} got {item!r}; each value must be {self.sweep_what}.") from None
            if value not in values:
                values.append(value)
        return values


def group(*options: Option) -> Callable[[type], type]:
    """Class decorator: the dataclass whose fields hold the values of these options."""

    def attach(cls: type) -> type:
        names = [f.name for f in fields(cls)]
        if names != [o.name for o in options]:
            raise TypeError(f"{cls.__name__}'s fields {names} differ from its options")
        cls.OPTIONS = options
        return cls

    return attach


def shared(*, sweep: bool = False) -> Callable[[Callable], Callable]:
    """Decorator for a Typer command: every parameter annotated with an option group class
    (made by `group`) is replaced by that group's options (after the command's own, in
    declaration order), and receives an instance holding their values."""

    def wrap(command: Callable) -> Callable:
        signature = inspect.signature(command, eval_str=True)
        own, slots = [], {}
        for param in signature.parameters.values():
            if hasattr(param.annotation, "OPTIONS"):
                slots[param.name] = param.annotation
            else:
                own.append(param)
        added = [
            inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=opt.annotated(sweep))
            for cls in slots.values()
            for opt in cls.OPTIONS
        ]
        clash = {p.name for p in own} & {p.name for p in added}
        if clash:
            raise TypeError(f"{command.__name__} declares shared options itself: {sorted(clash)}")

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            for slot, cls in slots.items():
                values = {}
                for opt in cls.OPTIONS:
                    value = kwargs.pop(opt.name)
                    values[opt.name] = opt.parse_sweep(value) if sweep and opt.sweep is not None else value
                kwargs[slot] = cls(**values)
            return command(**kwargs)

        parameters = own + added
        run.__signature__ = signature.replace(parameters=parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return wrap
