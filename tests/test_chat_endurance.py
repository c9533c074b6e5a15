"""`parrot chat` over a long session: 200 piped turns stay flat in memory and in context
handling (the oldest exchanges are dropped, as documented, and every turn is answered), and
Ctrl-C at seeded random points of a reply, in a real terminal, never ends the session."""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from parrot_cli.checkpoint.convert import convert
from tests.test_gguf import TinySpec, write_tiny_gguf

TURNS = 200
CONTEXT = 96
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STATS = re.compile(r"(\d+) tokens, .* context (\d+)/(\d+)")


@pytest.fixture(scope="module")
def tiny_chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a real byte-level tokenizer and a ChatML template: fast
    enough for hundreds of turns."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, TinySpec(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn=128))
    ckpt = convert(path, tmp_path_factory.mktemp("ckpt") / "tiny-chat", dtype="float32")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return ckpt


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_two_hundred_piped_turns_stay_flat(tiny_chat_checkpoint: Path) -> None:
    messages = [f"Message {i}: tell me about the parrot number {i} and its {i % 7} friends." for i in range(TURNS)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "parrot_cli", "chat", "--checkpoint-dir", str(tiny_chat_checkpoint),
         "--temperature", "0", "--max-new-tokens", "8", "--max-seq-length", str(CONTEXT), "--precision", "32-true",
         "--threads", "1"],  # tiny ops: one thread is faster, and immune to a loaded machine
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    proc.stdin.write("\n".join(messages) + "\n")
    proc.stdin.close()
    rss, contexts, dropped, other = [], [], 0, []
    for line in proc.stderr:
        if m := STATS.search(line):
            contexts.append((int(m[2]), int(m[3])))
            rss.append(_rss(proc.pid))
        elif "Context full: dropped the oldest" in line:
            dropped += 1
        elif line.strip():
            other.append(line)
    assert proc.wait(timeout=600) == 0, other
    reader.join(timeout=60)
    assert not other, other  # nothing but stats lines and drop notes
    assert len(contexts) == TURNS  # every message answered, none refused for length
    assert all(used <= limit == CONTEXT for used, limit in contexts), contexts
    assert dropped >= TURNS // 2  # the window is small: the oldest exchanges go, as documented
    assert min(used for used, _ in contexts[TURNS // 2 :]) > CONTEXT // 4  # ... but not all of them
    # Memory is flat: the last 50 turns hold no more than turns 25-75 did (+16 MB of slack).
    early = sorted(rss[25:75])[25]
    late = sorted(rss[-50:])[25]
    assert late - early < 16 * 1024**2, (early, late)


def _wait_until_replying(child, timeout: float = 60) -> None:
    """Until the terminal is back in cooked mode (ISIG on): the prompt has handed over to
    the reply, so Ctrl-C is a signal, not a key the prompt reads (Ctrl-C typed while the
    prompt still holds the terminal is type-ahead, read by the next prompt)."""
    import termios

    deadline = time.monotonic() + timeout
    while not termios.tcgetattr(child.child_fd)[3] & termios.ISIG:
        assert time.monotonic() < deadline, "the reply never started"
        time.sleep(0.002)


@pytest.mark.smollm2
def test_ctrl_c_at_random_points_of_a_reply_never_ends_the_session(smollm2_checkpoint: Path, tmp_path: Path) -> None:
    import pexpect

    rng = random.Random(int(os.environ.get("PARROT_KILL_SEED", "14")))
    env = {**os.environ, "PARROT_HOME": str(tmp_path / "home"), "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "parrot_cli", "chat", "--checkpoint-dir", str(smollm2_checkpoint),
                                           "--temperature", "0", "--max-new-tokens", "300", "--precision", "32-true",
                                           "--threads", "1"],
                          env=env, dimensions=(40, 120), encoding="utf-8", timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    child.logfile_read = io.StringIO()
    # The first point as soon as the reply starts (before its first token), then seeded ones.
    delays = [0.0, *(rng.uniform(0.05, 2.5) for _ in range(5))]
    try:
        child.expect_exact(">>>")
        for i, delay in enumerate(delays):
            child.send(f"Write a long story about dragon number {i}.\r")
            child.expect_exact(f"number {i}.")
            _wait_until_replying(child)
            time.sleep(delay)
            child.sendintr()
            if child.expect_exact(["Interrupted", pexpect.EOF]) == 1:
                child.close()
                raise AssertionError(f"the session ended at point {i} (+{delay:.2f}s): exit "
                                     f"{child.exitstatus}, signal {child.signalstatus}\n"
                                     f"{child.logfile_read.getvalue()[-4000:]!r}")
            child.expect_exact(">>>")
            assert child.isalive()
            # Drop the cut-off reply: kept, a row of them teaches the model to stop early, and a
            # reply that ends before the next Ctrl-C turns it into "Ctrl-C on an empty line" (exit).
            child.send("/undo\r")
            # (Nothing to undo when the Ctrl-C came before the first token: the message went too.)
            child.expect_exact(["Dropped the last exchange.", "Nothing to undo."])
            child.expect_exact(">>>")
        child.send("/set max_new_tokens 4\r")
        child.expect_exact(">>>")
        child.send("Say hello.\r")
        child.expect(r"\d+ tokens, .*context \d+/\d+")
        child.expect_exact(">>>")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    log = child.logfile_read.getvalue()
    print(f"\nchat: Ctrl-C at {', '.join(f'+{d:.2f}s' for d in delays)} after sending")
    assert child.exitstatus == 0, log
    assert "Traceback" not in log
