"""`parrot chat`: a multi-turn REPL that behaves like a good shell.

The conversation itself (templates, KV cache reuse, trimming, transcripts) is
`parrot_cli.chat.ChatSession`; this module is only the terminal around it. All terminal I/O
goes through one `ChatTerminal` object (prompt_toolkit in, rich out) whose constructor
does nothing, so tests drive it with prompt_toolkit's pipe input or a real pty. When stdin
is not a terminal, each input line (or all of it with --multiline) is one message and the
replies are printed plainly: `printf 'Hi\\nAgain?\\n' | parrot chat` works in a pipeline.

prompt_toolkit and torch are imported inside functions: `parrot --help` stays instant.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.table import Table

from parrot_cli.cli.common import (
    ModelOptions,
    SamplingOptions,
    console,
    load_llm,
    memory_line,
    print_error,
    utf8_stdout,
)
from parrot_cli.cli.options import shared
from parrot_cli.errors import ParrotError, UsageError

if TYPE_CHECKING:
    from rich.markdown import Markdown

    from parrot_cli.chat import ChatSession, Turn, TurnStats

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'  # a message starting with """ continues until a line ending with """
HISTORY_FILE = "chat_history"


def _complete_style(incomplete: str) -> list[str]:
    from parrot_cli.prompt_styles import STYLE_NAMES

    return [s for s in STYLE_NAMES if s.startswith(incomplete)]


@shared()
def chat(
    system: Annotated[str | None, typer.Option(help="System prompt for the conversation.")] = None,
    prompt_style: Annotated[
        str | None,
        typer.Option(
            help="How to format the conversation: 'template' (the checkpoint's chat template) or a "
            "built-in style (stablelm-alpha, redpajama-chat, falcon-instruct, llama2-chat, llama3, "
            "chatml, plain). Default: the template, else the style the model's name points to.",
            autocompletion=_complete_style,
        ),
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Print replies as plain text instead of Markdown.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide the stats line after each reply.")] = False,
    multiline: Annotated[
        bool, typer.Option("--multiline", help="Piped input: the whole input is one message, not one per line.")
    ] = False,
    *,
    load: ModelOptions,
    sampling: SamplingOptions,
) -> None:
    """Chat with a model: a multi-turn REPL (/help lists its commands); piped stdin is read as messages."""
    from parrot_cli.chat import ChatSession
    from parrot_cli.settings import Settings

    llm = load_llm(**load.load_kwargs(), settings=Settings(flags=sampling.values()))
    session = ChatSession(llm, system=system, prompt_style=prompt_style)
    session.llm.sampling()  # a bad --temperature etc. is a usage error now, not at the first reply
    if not sys.stdin.isatty():
        raise typer.Exit(run_piped(session, sys.stdin, utf8_stdout(), multiline=multiline, quiet=quiet))
    raise typer.Exit(Repl(session, ChatTerminal(), raw=raw, quiet=quiet).run())


# ---------------------------------------------------------------------- shared text


def stats_line(stats: TurnStats) -> str:
    """The one dim line after a reply: tokens, speed, context used."""
    r = stats.result
    speed = f"{r.tokens_per_second:.1f} tokens/s" if r and r.tokens_per_second else "- tokens/s"
    first = f"first token {r.time_to_first_token:.2f} s" if r and r.generated_tokens else "no tokens"
    return (
        f"{stats.generated} tokens, {speed}, {first} (prefilled {stats.prefilled}), "
        f"context {stats.context_used}/{stats.context_limit}"
    )


def dropped_line(stats: TurnStats) -> str:
    n = stats.dropped
    return (
        f"Context full: dropped the oldest {n} exchange{'s' if n != 1 else ''} to fit the "
        f"{stats.context_limit}-token window (the system prompt is kept)."
    )


def run_piped(session: ChatSession, source: TextIO, out: TextIO, *, multiline: bool, quiet: bool) -> int:
    """Scriptable mode: each line (or the whole input) is a message; replies go plainly to
    `out`, one per message; notes go to stderr."""
    messages: Iterable[str] = [source.read()] if multiline else source
    for line in messages:
        text = line.strip() if multiline else line.rstrip("\r\n")
        if not text.strip():
            continue
        turn = session.send(text)
        if turn.stats.dropped:
            console.print(f"[dim]{dropped_line(turn.stats)}[/]", soft_wrap=True)
        try:
            for piece in turn:
                out.write(piece)
                out.flush()
        finally:
            turn.close()
        out.write("\n")
        out.flush()
        if not quiet:
            console.print(f"[dim]{stats_line(turn.stats)}[/]", soft_wrap=True)
    return 0


# ---------------------------------------------------------------------- terminal I/O


class ChatTerminal:
    """Every terminal interaction of the REPL: reading a message (prompt_toolkit: history,
    Ctrl-R, Tab completion, multi-line input, bracketed paste) and writing replies (rich).

    Constructing it does nothing: the prompt session is built on the first `read`. Tests
    pass prompt_toolkit `input`/`output` objects (e.g. a pipe input) and rich consoles.
    """

    def __init__(
        self,
        *,
        input: Any = None,
        output: Any = None,
        history_file: Path | None = None,
        out: Console | None = None,
        err: Console | None = None,
        commands: Iterable[str] = (),
    ) -> None:
        self._input = input
        self._output = output
        self._history_file = history_file
        self._out = out
        self._err = err
        self._commands = tuple(commands)
        self._prompt: Any = None

    @property
    def out(self) -> Console:
        """Where replies go: stdout."""
        if self._out is None:
            self._out = Console(highlight=False)
        return self._out

    @property
    def err(self) -> Console:
        """Where everything else goes: stderr."""
        return self._err if self._err is not None else console

    def set_commands(self, names: Iterable[str]) -> None:
        """The slash commands Tab completes."""
        self._commands = tuple(names)

    # ------------------------------------------------------------------ input

    def read(self) -> str | None:
        """One message from the user; None means "leave" (Ctrl-D, or Ctrl-C on an empty line).

        While the prompt holds the terminal (raw mode) Ctrl-C is a key, bound below. A
        SIGINT can still arrive in the moments the prompt sets the terminal up or hands it
        back (Enter, then Ctrl-C at once): prompt_toolkit's own handler would swallow it, or
        end the session. Without that handler it is a KeyboardInterrupt: the message being
        sent is dropped (as a reply interrupted before its first token is) and the prompt
        comes back."""
        try:
            text = self._session().prompt(PROMPT, handle_sigint=False)
        except EOFError:
            return None
        except KeyboardInterrupt:
            self.note("Interrupted.")
            return ""
        return unfence(text)

    def _session(self) -> Any:
        if self._prompt is None:
            from prompt_toolkit import PromptSession

            self._prompt = PromptSession(
                history=self._history(),
                key_bindings=_key_bindings(),
                completer=_slash_completer(lambda: self._commands),
                complete_while_typing=False,
                multiline=True,  # Enter is bound below: it submits unless a """ block is open
                prompt_continuation=lambda width, line, wrap: CONTINUATION,
                input=self._input,
                output=self._output,
            )
        return self._prompt

    def _history(self) -> Any:
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = self._history_file or default_history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as err:
            self.note(f"History is not kept: cannot write {path} ({err.strerror}).")
            return InMemoryHistory()
        return FileHistory(str(path))

    # ------------------------------------------------------------------ output

    def reply(self, pieces: Iterable[str], *, raw: bool) -> None:
        """Stream a reply to stdout: Markdown rendered as it grows, or raw text."""
        out = self.out
        if raw or not out.is_terminal:
            for piece in pieces:
                out.file.write(piece)
                out.file.flush()
            out.file.write("\n")
            out.file.flush()
            return
        from rich.live import Live

        # Finished blocks are printed once, above the live area; only the block still being
        # written is redrawn, so a long reply never overflows the live region.
        tail = ""
        with Live(reply_markdown(""), console=out, refresh_per_second=8, transient=False) as live:
            for piece in pieces:
                tail += piece
                cut = stable_cut(tail)
                if cut:
                    live.console.print(reply_markdown(tail[:cut]))
                    live.console.print()
                    tail = tail[cut:]
                live.update(reply_markdown(tail))

    def note(self, text: str) -> None:
        """One dim line on stderr."""
        self.err.print(f"[dim]{_escape(text)}[/]", soft_wrap=True)

    def show(self, renderable: Any) -> None:
        self.err.print(renderable)

    def error(self, err: BaseException | str) -> None:
        if self._err is None:
            print_error(err)
        else:
            self._err.print(f"[bold red]Error:[/] {_escape(str(err))}", soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def default_history_file() -> Path:
    from parrot_cli.paths import parrot_home

    return parrot_home() / HISTORY_FILE


def unfence(text: str) -> str:
    """Strip the \"\"\" of a multi-line block (the quotes are not part of the message)."""
    stripped = text.strip()
    if stripped.startswith(FENCE):
        stripped = stripped[len(FENCE) :]
        if stripped.endswith(FENCE):
            stripped = stripped[: -len(FENCE)]
        return stripped.strip("\n")
    return text


def fence_open(text: str) -> bool:
    """Whether Enter should add a line instead of submitting: a \"\"\" block not yet closed."""
    stripped = text.strip()
    return stripped.startswith(FENCE) and not (len(stripped) >= 2 * len(FENCE) and stripped.endswith(FENCE))


def reply_markdown(text: str) -> Markdown:
    """A reply as rich Markdown that keeps the model's line breaks.

    CommonMark folds a single newline inside a paragraph into a space (a "soft break"), so a
    poem or a line-broken list would print as one paragraph. Chat UIs (and GitHub comments)
    show it as a line break; so does parrot: rich's parse is kept (whatever syntax it
    renders) and each soft break becomes a hard one. Code blocks keep their lines anyway.
    """
    from rich.markdown import Markdown  # pygments too: not on the --help path

    markdown = Markdown(text)
    for block in markdown.parsed:  # markdown-it tokens (rich >= 13.2); inline ones have children
        for token in block.children or ():
            if token.type == "softbreak":
                token.type = "hardbreak"
    return markdown


def stable_cut(text: str) -> int:
    """Where the finished Markdown blocks of a growing reply end (0: none yet): the last
    blank line that is not inside a code fence."""
    at = text.rfind("\n\n")
    if at <= 0 or text[:at].count("```") % 2:
        return 0
    return at + 2


def _key_bindings() -> Any:
    from prompt_toolkit.enums import DEFAULT_BUFFER
    from prompt_toolkit.filters import has_focus
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()
    editing = has_focus(DEFAULT_BUFFER)  # not while Ctrl-R search has the focus

    @kb.add("enter", filter=editing, eager=True)
    def _enter(event: Any) -> None:
        buffer = event.current_buffer
        if fence_open(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @kb.add("escape", "enter", filter=editing)
    def _newline(event: Any) -> None:  # Alt-Enter
        event.current_buffer.insert_text("\n")

    @kb.add("c-c", filter=editing)
    def _interrupt(event: Any) -> None:
        # Like a shell: Ctrl-C drops what was typed; on an empty line it leaves.
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=EOFError())

    return kb


def _slash_completer(commands: Callable[[], Iterable[str]]) -> Any:
    from prompt_toolkit.completion import Completer, Completion

    from parrot_cli.chat import SAMPLING_KEYS

    class SlashCompleter(Completer):
        """Tab completes slash commands, and the setting names after /set."""

        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Any]:
            text = document.text_before_cursor
            if not text.startswith("/") or "\n" in text:
                return
            words = text.split(" ")
            if len(words) == 1:
                for name in commands():
                    if name.startswith(text):
                        yield Completion(name, start_position=-len(text))
            elif words[0] == "/set" and len(words) == 2:
                for key in SAMPLING_KEYS:
                    if key.startswith(words[1]):
                        yield Completion(key, start_position=-len(words[1]))

    return SlashCompleter()


# ---------------------------------------------------------------------- the REPL


@dataclass(frozen=True)
class Command:
    usage: str
    help: str
    run: Callable[[Repl, str], bool]  # returns True to leave the REPL


class Repl:
    """The read-eval-print loop over a ChatSession and a ChatTerminal."""

    def __init__(self, session: ChatSession, term: ChatTerminal, *, raw: bool = False, quiet: bool = False) -> None:
        self.session = session
        self.term = term
        self.raw = raw
        self.quiet = quiet

    def run(self) -> int:
        """Loop until /exit, Ctrl-D or Ctrl-C on an empty line; returns the exit code (0)."""
        self.term.set_commands(COMMANDS)
        self.term.note(
            f"Chatting with {self.session.llm.checkpoint_dir.name} ({self.session.style.name}). "
            '/help for commands, """ for multi-line messages, Ctrl-D to leave.'
        )
        while True:
            text = self.term.read()
            if text is None:
                return 0
            try:
                if self._handle(text):
                    return 0
            except KeyboardInterrupt:
                # Ctrl-C anywhere outside the prompt (starting a reply, printing its stats,
                # a slow command) stops that, never the session.
                self.term.note("Interrupted.")

    def _handle(self, text: str) -> bool:
        """One message or slash command; True to leave."""
        if not text.strip():
            return False
        if text.startswith("/"):
            name, _, arg = text.strip().partition(" ")
            command = COMMANDS.get(name)
            if command is None:
                self.term.error(f"Unknown command {name}; /help lists the commands.")
                return False
            try:
                return command.run(self, arg.strip())
            except ParrotError as err:
                self.term.error(err)
            return False
        self.reply(functools.partial(self.session.send, text))
        return False

    def reply(self, start: Callable[[], Turn]) -> None:
        """Start a turn and stream it; Ctrl-C stops the reply and keeps the session."""
        try:
            turn = start()
        except ParrotError as err:
            self.term.error(err)
            return
        if turn.stats.dropped:
            self.term.note(dropped_line(turn.stats))
        try:
            self.term.reply(turn, raw=self.raw)
        except KeyboardInterrupt:
            turn.close()
            if turn.text:
                self.term.note("Interrupted; the reply so far is kept (/undo drops it, /regen retries).")
            else:  # nothing came yet: the session dropped the message too (ChatSession._finish_turn)
                self.term.note("Interrupted before the reply began; the message was dropped.")
        except ParrotError as err:
            turn.close()
            self.term.error(err)
        finally:
            turn.close()
        if not self.quiet:
            self.term.note(stats_line(turn.stats))

    # ------------------------------------------------------------------ commands

    def _help(self, arg: str) -> bool:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for name, command in COMMANDS.items():
            table.add_row(f"{name} {command.usage}".strip(), command.help)
        for keys, what in KEYS:
            table.add_row(keys, what)
        self.term.show(table)
        return False

    def _exit(self, arg: str) -> bool:
        return True

    def _clear(self, arg: str) -> bool:
        self.session.clear()
        self.term.note("New conversation.")
        return False

    def _system(self, arg: str) -> bool:
        self.session.system = arg or None
        self.term.note("System prompt set." if arg else "System prompt removed.")
        return False

    def _set(self, arg: str) -> bool:
        key, _, value = arg.partition(" ")
        if not key:
            for name, val, source in self.session.settings():
                self.term.note(f"{name} = {val}  ({source})")
            return False
        if not value.strip():
            raise UsageError("Usage: /set KEY VALUE (e.g. /set temperature 0.2); /set lists the settings.")
        parsed = self.session.set_option(key, value.strip())
        self.term.note(f"{key} = {parsed}" if parsed is not None else f"{key} reset to its default.")
        return False

    def _show(self, arg: str) -> bool:
        s = self.session
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("model", str(s.llm.checkpoint_dir))
        table.add_row("precision", f"{s.llm.precision} on {s.llm.device}")
        table.add_row("prompt style", f"{s.style.name} ({s.style.description})")
        table.add_row("system", s.system if s.system is not None else "(none)")
        for name, value, source in s.settings():
            table.add_row(name, f"{value}  [dim]({source})[/]")
        table.add_row("context", f"{s.context_used} / {s.context_limit} tokens")
        table.add_row("messages", str(len(s.messages)))
        self.term.show(table)
        return False

    def _undo(self, arg: str) -> bool:
        self.term.note("Dropped the last exchange." if self.session.undo() else "Nothing to undo.")
        return False

    def _regen(self, arg: str) -> bool:
        self.reply(self.session.regenerate)
        return False

    def _save(self, arg: str) -> bool:
        if not arg:
            raise UsageError("Usage: /save FILE")
        path = self.session.save(arg)
        self.term.note(f"Saved {len(self.session.messages)} messages to {path}.")
        return False

    def _load(self, arg: str) -> bool:
        if not arg:
            raise UsageError("Usage: /load FILE")
        self.session.load(arg)
        self.term.note(f"Loaded {len(self.session.messages)} messages from {arg}.")
        for message in self.session.messages:
            self.term.note(f"{message['role']}: {message['content']}")
        return False

    def _stats(self, arg: str) -> bool:
        from parrot_cli.chat import Totals

        t = Totals.of(self.session.turns)
        speed = t.generated / t.seconds if t.seconds else 0.0
        first = f"{t.first_token[0]:.2f} s first, {t.first_token[-1]:.2f} s last" if t.first_token else "-"
        self.term.note(
            f"{t.replies} replies, {t.generated} tokens generated ({speed:.1f} tokens/s overall); "
            f"prompt tokens prefilled {t.prefilled}, reused from the KV cache {t.reused}, "
            f"recomputed after edits {t.rewound}; exchanges dropped {t.dropped}; "
            f"time to first token: {first}; context {self.session.context_used}/{self.session.context_limit}; "
            f"memory {memory_line(self.session.llm)}."
        )
        return False


# The one command table: dispatch, /help and Tab completion all read it.
COMMANDS: dict[str, Command] = {
    "/help": Command("", "Show this help.", Repl._help),
    "/exit": Command("", "Leave (also Ctrl-D, or Ctrl-C on an empty line).", Repl._exit),
    "/clear": Command("", "Start a new conversation (keeps the system prompt).", Repl._clear),
    "/system": Command("TEXT", "Set the system prompt (no TEXT removes it).", Repl._system),
    "/set": Command("KEY VALUE", "Change a sampling setting (generate's names); /set alone lists them.", Repl._set),
    "/show": Command("", "Model, prompt style, settings, context used.", Repl._show),
    "/undo": Command("", "Drop the last exchange.", Repl._undo),
    "/regen": Command("", "Generate the last reply again.", Repl._regen),
    "/save": Command("FILE", "Save the conversation as a JSON transcript.", Repl._save),
    "/load": Command("FILE", "Load a JSON transcript.", Repl._load),
    "/stats": Command("", "Token counts, speed and KV-cache reuse for this session.", Repl._stats),
}
KEYS = (
    ('"""', 'Start a multi-line message; end it with """.'),
    ("Alt-Enter", "New line without sending."),
    ("Ctrl-C", "Stop the reply; on an empty line, leave."),
    ("Ctrl-R", "Search the history."),
    ("Tab", "Complete a slash command."),
)
