"""`parrot chat` as users meet it: keys and commands through prompt_toolkit's pipe input
(in-process, fast), then the real process in a pseudo-terminal (pexpect) and in a pipe."""

from __future__ import annotations

import io
import json
import os
import re
import sys

import pytest
from rich.console import Console

from parrot_cli.chat import ChatSession
from parrot_cli.cli.chat import (
    COMMANDS,
    ChatTerminal,
    Repl,
    _slash_completer,
    fence_open,
    reply_markdown,
    stable_cut,
    unfence,
)
from tests.conftest import run_parrot

pytestmark = pytest.mark.smollm2


def test_input_helpers():
    assert fence_open('"""') and fence_open('"""\nline') and not fence_open('"""\nline\n"""')
    assert not fence_open("plain text")
    assert unfence('"""\nline one\nline two\n"""') == "line one\nline two"
    assert unfence("  not fenced ") == "  not fenced "
    assert stable_cut("para one\n\npara tw") == len("para one\n\n")
    assert stable_cut("```\ncode\n\nmore") == 0  # never cut inside a code fence
    assert stable_cut("no blank line yet") == 0


def plain(terminal_output: str) -> str:
    """What a terminal shows, without rich's colours, cursor moves and carriage returns."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\r", "", terminal_output)


def test_replies_keep_their_line_breaks_while_streaming():
    """A poem keeps its lines (CommonMark alone would fold them into one paragraph), a list
    and a code block keep theirs, and a finished block is on screen before the reply ends."""
    out = io.StringIO()
    term = ChatTerminal(out=Console(file=out, width=80, force_terminal=True, color_system=None),
                        err=Console(file=io.StringIO()))
    shown_while_streaming = []

    def pieces():
        yield from ["The waves roll in,\n", "the gulls cry out,\n", "the tide **forgets**.\n\n"]
        shown_while_streaming.append(plain(out.getvalue()))  # the poem is a finished block now
        yield from ["- salt\n", "- wind\n\n", "```\nx = 1\n", "\ny = 2\n```\n", "Bye"]

    term.reply(pieces(), raw=False)
    poem = re.compile(r"The waves roll in, *\nthe gulls cry out, *\nthe tide forgets\.")
    assert poem.search(shown_while_streaming[0]), shown_while_streaming[0]
    shown = plain(out.getvalue())
    assert poem.search(shown) and "in, the gulls" not in shown, shown
    assert re.search(r"• salt *\n *• wind", shown), shown
    assert re.search(r"x = 1 *\n *\n *y = 2", shown), shown
    assert "Bye" in shown
    # The renderer alone: each single newline is a line break; a paragraph break stays one.
    rendered = io.StringIO()
    Console(file=rendered, width=80).print(reply_markdown("one\ntwo\n\nthree"))
    assert [line.rstrip() for line in rendered.getvalue().splitlines()] == ["one", "two", "", "three"]


def test_tab_completes_slash_commands_and_setting_names():
    from prompt_toolkit.document import Document

    completer = _slash_completer(lambda: COMMANDS)
    words = lambda text: [c.text for c in completer.get_completions(Document(text), None)]  # noqa: E731
    assert words("/he") == ["/help"]
    assert words("/s") == ["/system", "/set", "/show", "/save", "/stats"]
    assert words("/set te") == ["temperature"]
    assert words("hello /he") == []


def test_repl_keys_and_commands_through_pipe_input(smollm2_llm, tmp_path):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    session = ChatSession(smollm2_llm, overrides={"temperature": 0.5, "max_new_tokens": 3})
    out, err = io.StringIO(), io.StringIO()
    history = tmp_path / "history"
    keys = [
        "/set temperature 0\r",
        '"""\rline one\rline two\r"""\r',  # a multi-line block
        "abc\x1b\rdef\r",  # Alt-Enter adds a line
        "\x1b[200~first\rsecond\x1b[201~\r",  # a bracketed paste does not submit half of itself
        "typed then dropped\x03",  # Ctrl-C on a non-empty line clears it
        "/undo\r",
        "/show\r",
        "/stats\r",
        "/bogus\r",
        "\x03",  # Ctrl-C on an empty line leaves
    ]
    with create_pipe_input() as pipe:
        term = ChatTerminal(
            input=pipe, output=DummyOutput(), history_file=history,
            out=Console(file=out, width=100), err=Console(file=err, width=300),
        )
        pipe.send_text("".join(keys))
        code = Repl(session, term).run()
    assert code == 0
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["line one\nline two", "abc\ndef"]
    assert session.overrides["temperature"] == 0.0
    notes = err.getvalue()
    assert notes.count("tokens/s") >= 3 + 1  # a stats line per reply, and /stats
    assert "Dropped the last exchange" in notes
    assert "Unknown command /bogus" in notes
    assert re.search(r"context\s+\d+ / 8192 tokens", notes)  # /show
    assert "temperature" in notes and "(/set)" in notes
    assert len([line for line in out.getvalue().splitlines() if line]) >= 2  # replies on stdout
    assert "typed then dropped" not in history.read_text()
    assert "+line one\n+line two\n" in history.read_text()


PROMPT = ">>>"  # prompt_toolkit moves the cursor instead of printing the trailing space


def say(child, text: str) -> None:
    """Type a line and press Enter (a terminal sends CR)."""
    child.send(text + "\r")


def _spawn(*args: str, home, **kwargs):
    import pexpect

    env = {**os.environ, "PARROT_HOME": str(home), "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "parrot_cli", *args], env=env, dimensions=(40, 120),
                          encoding="utf-8", timeout=300, **kwargs)
    child.logfile_read = io.StringIO()
    return child


def test_real_terminal_session(smollm2_checkpoint, tmp_path):
    """Two turns that depend on each other, Ctrl-C during a long reply and a new prompt
    answered after it, /save then /load, the history file, Ctrl-D exits 0."""
    import pexpect

    home = tmp_path / "home"
    child = _spawn("chat", "--checkpoint-dir", str(smollm2_checkpoint), "--temperature", "0",
                   "--max-new-tokens", "12", "--precision", "32-true", home=home)
    stats = re.compile(r"tokens/s.*context \d+/\d+")
    try:
        child.expect_exact(PROMPT)
        say(child, "I have a cat called Tom.")
        child.expect(stats)
        child.expect_exact(PROMPT)
        say(child, "What is my cat called?")
        child.expect(stats)
        assert "Tom" in child.before
        child.expect_exact(PROMPT)

        say(child, "/set max_new_tokens 500")
        child.expect_exact(PROMPT)
        say(child, "Write a long story about a dragon.")
        child.expect_exact("dragon.")
        child.expect_exact("heart")  # the reply ("In the heart of the desert...") is streaming
        child.sendintr()
        child.expect_exact("Interrupted")
        child.expect(stats)
        child.expect_exact(PROMPT)
        say(child, "/set max_new_tokens 6")
        child.expect_exact(PROMPT)
        say(child, "Say hello.")
        child.expect(stats)
        child.expect_exact(PROMPT)

        transcript = tmp_path / "chat.json"
        say(child, f"/save {transcript}")
        child.expect_exact("Saved 8 messages")
        say(child, "/clear")
        child.expect_exact("New conversation")
        say(child, f"/load {transcript}")
        child.expect_exact("Loaded 8 messages")
        say(child, "/show")
        child.expect(r"messages\s+8")
        child.expect_exact(PROMPT)

        say(child, "/clear")  # a poem, alone: its reply breaks lines (greedy)
        child.expect_exact("New conversation")
        say(child, "/set max_new_tokens 20")
        child.expect_exact(PROMPT)
        say(child, "Write a short poem about the sea.")
        child.expect(stats)
        child.expect_exact(PROMPT)
        poem_file = tmp_path / "poem.json"
        say(child, f"/save {poem_file}")
        child.expect_exact("Saved 2 messages")
        child.expect_exact(PROMPT)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    log = child.logfile_read.getvalue()
    assert child.exitstatus == 0, log
    assert "Traceback" not in log
    saved = json.loads(transcript.read_text())
    assert [m["content"] for m in saved["messages"][::2]] == [
        "I have a cat called Tom.", "What is my cat called?", "Write a long story about a dragon.", "Say hello.",
    ]
    assert saved["messages"][5]["content"]  # the interrupted reply, kept as far as it got
    history = (home / "chat_history").read_text()
    assert "+I have a cat called Tom." in history and "+What is my cat called?" in history
    # The poem's lines are the terminal's lines, as the model wrote them (not one paragraph).
    poem = [line.strip() for line in json.loads(poem_file.read_text())["messages"][1]["content"].splitlines()]
    assert len(poem) >= 2 and all(poem[:2]), poem
    shown = plain(log)
    assert re.search(re.escape(poem[0]) + r" *\n *" + re.escape(poem[1][:8]), shown), shown[-3000:]


def test_piped_mode_one_reply_per_line_and_overflow(smollm2_checkpoint):
    lines = ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a city."]
    result = run_parrot("chat", "--checkpoint-dir", str(smollm2_checkpoint), "--temperature", "0",
                        "--max-new-tokens", "8", "--max-seq-length", "80", "--system", "You are terse.",
                        "--raw", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(re.findall(r"tokens/s", result.stderr)) == len(lines)  # one reply per line
    assert "Context full: dropped the oldest" in result.stderr
    assert result.stdout.strip() and "\x1b[" not in result.stdout  # plain text
