"""`ChatSession`: a multi-turn conversation with one `LLM`, its KV cache kept between turns.

Each turn renders the whole conversation with the chat template (or built-in prompt
style) and encodes it. The KV cache still holds the previous turn's prompt and reply, so
only the tokens after the longest common prefix with what the cache holds are prefilled:
normally the reply's end-of-turn tokens plus the new user turn. A template that rewrites
earlier turns (or /undo, /regen, trimming) is handled by the same rule: prefill from the
first differing token, and count it (`TurnStats.rewound`). The reply is then exactly what
a fresh model given the whole conversation would produce.

When the conversation outgrows the context window the oldest exchanges are dropped (never
the system prompt) and the turn says so (`TurnStats.dropped`).

No terminal I/O here: the REPL (cli/chat.py) renders; tests drive this class directly.
A session assumes it is the only user of its LLM's KV cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parrot_cli.errors import ContextLengthError, ParrotError, UsageError
from parrot_cli.settings import SETTINGS

if TYPE_CHECKING:
    from parrot_cli.api import LLM, GenerationResult, TextStream

# The sampling settings a chat can change with /set: the names of `parrot generate`'s options.
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
TRANSCRIPT_FORMAT = "parrot-chat"
TRANSCRIPT_VERSION = 1


@dataclass
class TurnStats:
    """What one reply cost, in tokens: the counts that prove the KV cache was reused."""

    prompt_tokens: int = 0  # the whole rendered conversation, generation prompt included
    prefilled: int = 0  # prompt tokens computed this turn
    reused: int = 0  # prompt tokens already in the KV cache
    rewound: int = 0  # cached tokens that no longer matched the rendering (recomputed)
    dropped: int = 0  # oldest exchanges dropped to fit the context window
    context_limit: int = 0
    interrupted: bool = False
    result: GenerationResult | None = None

    @property
    def generated(self) -> int:
        return self.result.generated_tokens if self.result else 0

    @property
    def context_used(self) -> int:
        """Positions the conversation occupies after this reply."""
        return self.prompt_tokens + self.generated


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Turn:
    """One reply in progress: iterate for its text pieces. When iteration ends (finished,
    interrupted by Ctrl-C, or `close()`d) the reply joins the conversation and the session
    records what the KV cache now holds."""

    def __init__(self, session: ChatSession, stream: TextStream, ids: list[int], stats: TurnStats) -> None:
        self._session = session
        self._stream = stream
        self._ids = ids
        self.stats = stats
        self.text = ""
        self._completed = False
        self._finished = False
        self._gen = self._pieces()

    def __iter__(self) -> Iterator[str]:
        return self._gen

    def _pieces(self) -> Iterator[str]:
        try:
            for piece in self._stream:
                self.text += piece
                yield piece
            self._completed = True
        finally:
            self._finish()

    def close(self) -> None:
        """Stop the reply here (idempotent); what was generated so far is kept."""
        self._gen.close()
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._stream.close()
        result = self._stream.result
        self.stats.result = result
        self.stats.interrupted = not self._completed
        self._session._finish_turn(self, result)


class ChatSession:
    """Conversation state (system prompt, messages, sampling overrides) over one LLM."""

    def __init__(
        self,
        llm: LLM,
        *,
        system: str | None = None,
        prompt_style: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.llm = llm
        self.style = llm.chat_style(prompt_style)
        self.system = system
        self.messages: list[dict[str, str]] = []  # user/assistant turns, oldest first
        self.overrides: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            self.set_option(key, value)
        self.turns: list[TurnStats] = []
        self._cache_ids: list[int] = []  # what positions [0, n) of the KV cache hold
        self._generations = 0  # seeds advance per reply so /regen samples anew

    # ------------------------------------------------------------------ conversation

    def conversation(self) -> list[dict[str, str]]:
        """The messages the template sees: the system prompt (if any), then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self.messages]

    def encode(self, messages: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the conversation rendered up to the assistant's next reply."""
        return self.style.encode(self.llm.tokenizer, self.conversation() if messages is None else messages)

    def send(self, text: str) -> Turn:
        """Add a user message and start the reply to it."""
        if not text.strip():
            raise UsageError("The message is empty.")
        saved = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            return self._start()
        except BaseException:
            self.messages = saved  # trimming for a message that fits nowhere is undone too
            raise

    def regenerate(self) -> Turn:
        """Drop the last reply and generate another one to the same message."""
        if not self.messages:
            raise UsageError("Nothing to regenerate yet.")
        saved = list(self.messages)
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        try:
            return self._start()
        except BaseException:
            self.messages = saved
            raise

    def undo(self) -> bool:
        """Drop the last exchange (the reply and the message it answered)."""
        if not self.messages:
            return False
        if self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()
        return True

    def clear(self) -> None:
        """Start a new conversation (the system prompt stays; so does its cached prefix)."""
        self.messages = []

    # ------------------------------------------------------------------ settings

    def set_option(self, key: str, value: Any) -> Any:
        """/set KEY VALUE: a sampling setting for the following replies ('none' resets it)."""
        name = key.strip().lower().replace("-", "_")
        if name not in SAMPLING_KEYS:
            raise UsageError(f"Unknown setting {key!r}; choose one of {', '.join(SAMPLING_KEYS)}.")
        try:
            parsed = None if str(value).strip().lower() in ("none", "default") else SETTINGS[name].parse(value)
        except (TypeError, ValueError) as err:
            raise UsageError(f"Invalid value {value!r} for {name}.") from err
        trial = {k: v for k, v in {**self.overrides, name: parsed}.items() if v is not None}
        self.llm.sampling(**trial)  # raises UsageError for out-of-range values
        self.overrides = trial
        return parsed

    def settings(self) -> list[tuple[str, Any, str]]:
        """(name, value, where it came from) for each sampling setting."""
        resolved = self.llm.settings.with_flags(**self.overrides)
        return [
            (name, resolved.get(name), "/set" if name in self.overrides else self.llm.settings.source(name))
            for name in SAMPLING_KEYS
        ]

    @property
    def context_limit(self) -> int:
        return self.llm.context_limit

    @property
    def context_used(self) -> int:
        """Tokens of the conversation so far (what the KV cache holds)."""
        return len(self._valid_cache())

    # ------------------------------------------------------------------ transcripts

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": TRANSCRIPT_VERSION,
            "model": self.llm.checkpoint_dir.name,
            "prompt_style": self.style.name,
            "system": self.system,
            "settings": dict(self.overrides),
            "messages": [dict(m) for m in self.messages],
        }

    def save(self, path: str | Path) -> Path:
        """Write the conversation as a JSON transcript (atomically: all of it or nothing)."""
        path = Path(path).expanduser()
        data = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            raise ParrotError(f"Cannot write {path} ({err.strerror or err}); choose another file.") from err
        return path

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a saved transcript (the KV cache keeps whatever
        prefix the two conversations share)."""
        path = Path(path).expanduser()
        bad = f"{path} is not a parrot chat transcript"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise UsageError(f"No transcript at {path}; /save FILE writes one.") from err
        except OSError as err:
            raise ParrotError(f"Cannot read {path} ({err.strerror or err}).") from err
        except (UnicodeDecodeError, ValueError) as err:
            raise UsageError(f"{bad} (not valid JSON).") from err
        if not isinstance(data, dict) or data.get("format") != TRANSCRIPT_FORMAT:
            raise UsageError(f"{bad} (no \"format\": \"{TRANSCRIPT_FORMAT}\").")
        messages = data.get("messages")
        system = data.get("system")
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok or not (system is None or isinstance(system, str)):
            raise UsageError(f"{bad} (messages need a user or assistant role and text content).")
        settings = data.get("settings") or {}
        if not isinstance(settings, dict):
            raise UsageError(f"{bad} (settings must be an object).")
        previous = dict(self.overrides)
        try:
            self.overrides = {}
            for key, value in settings.items():
                self.set_option(key, value)
        except UsageError:
            self.overrides = previous
            raise
        self.system = system
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]

    # ------------------------------------------------------------------ the turn

    def _valid_cache(self) -> list[int]:
        # Someone cleared the model's caches (a reload, another generation path): nothing kept.
        if self.llm.model.cache_length < len(self._cache_ids):
            self._cache_ids = []
        return self._cache_ids

    def _start(self) -> Turn:
        _, max_new, seed = self.llm.sampling(**self.overrides)
        limit = self.llm.context_limit
        reserve = max(1, min(max_new, limit // 2))  # room kept for the reply when trimming
        ids = self.encode()
        dropped = 0
        while len(ids) + reserve > limit and self._drop_oldest():
            dropped += 1
            ids = self.encode()
        if len(ids) >= limit:
            raise ContextLengthError(
                f"This message needs {len(ids)} tokens with the system prompt, but the context "
                f"window is {limit} tokens; send a shorter message (or raise --max-seq-length)."
            )
        cached = self._valid_cache()
        reused = min(common_prefix(cached, ids), len(ids) - 1)  # prefill >= 1 token for logits
        stats = TurnStats(
            prompt_tokens=len(ids),
            prefilled=len(ids) - reused,
            reused=reused,
            rewound=len(cached) - reused if reused < len(cached) else 0,
            dropped=dropped,
            context_limit=limit,
        )
        sampling = dict(self.overrides)
        if seed is not None:
            sampling["seed"] = seed + self._generations
        stream = self.llm.stream_ids(
            ids[reused:], start_pos=reused, history=ids[:reused], stop=list(self.style.stop), **sampling
        )
        self._generations += 1
        # From here on the cache beyond the common prefix is being rewritten.
        self._cache_ids = ids[:reused]
        return Turn(self, stream, ids, stats)

    def _drop_oldest(self) -> bool:
        """Drop the oldest exchange, keeping the message being answered; False if none."""
        if len(self.messages) <= 1:
            return False
        self.messages.pop(0)
        while len(self.messages) > 1 and self.messages[0]["role"] == "assistant":
            self.messages.pop(0)
        return True

    def _finish_turn(self, turn: Turn, result: GenerationResult) -> None:
        # The last sampled token was never fed back (and one interrupted mid-forward may be
        # half-written), so the cache holds the prompt plus every generated token but the last.
        if result.token_ids:
            self._cache_ids = turn._ids + result.token_ids[:-1]
        if turn.text or not turn.stats.interrupted:
            self.messages.append({"role": "assistant", "content": turn.text})
        elif self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # interrupted before any text: as if never sent
        self.turns.append(turn.stats)


@dataclass
class Totals:
    """Session totals for /stats."""

    replies: int = 0
    generated: int = 0
    prefilled: int = 0
    reused: int = 0
    rewound: int = 0
    dropped: int = 0
    seconds: float = 0.0
    first_token: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, turns: list[TurnStats]) -> Totals:
        t = cls()
        for s in turns:
            t.replies += 1
            t.generated += s.generated
            t.prefilled += s.prefilled
            t.reused += s.reused
            t.rewound += s.rewound
            t.dropped += s.dropped
            if s.result is not None:
                t.seconds += s.result.seconds
                t.first_token.append(s.result.time_to_first_token)
        return t
