"""Tokenizer, chat template rendering and streaming helpers for a parrot checkpoint.

A checkpoint directory carries Hugging Face style tokenizer files (`tokenizer.json`,
`tokenizer_config.json`, optionally `chat_template.jinja`) and `generation_config.json`.
This module reads them with the `tokenizers` library and jinja2 only, because it sits on the
CLI's fast paths (chat-template previews, token counting) that must not pay for importing torch.

Three pieces live here:

* `Tokenizer`: encode/decode with the checkpoint's own rules (BOS handling, special tokens in the
  text, every EOS id the model may emit) and chat template rendering in `chat_template`'s
  jinja2 sandbox (with time, memory and size limits), since templates ship with downloaded
  checkpoints and are untrusted code.
* `IncrementalDecoder`: turns generated ids into text pieces that never change once emitted.
* `StopMatcher`: holds back text that may still become a stop string, so stops never leak.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as _HFTokenizer

from parrot_cli.chat_template import ChatTemplateError, compile_template, one_line, render
from parrot_cli.checkpoint.info import read_json
from parrot_cli.errors import CheckpointError, UsageError

__all__ = [
    "ChatTemplateError",
    "IncrementalDecoder",
    "StopMatcher",
    "Tokenizer",
]

# U+FFFD is what the decoders produce for bytes that are not (yet) valid UTF-8.
_REPLACEMENT_CHAR = "\ufffd"
# The token spelling that `tokenizers`' ByteFallback decoder turns back into a raw byte.
_BYTE_TOKEN_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# --------------------------------------------------------------------------------------------
# File reading helpers
# --------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _int_list(value: Any) -> list[int]:
    """generation_config ids are an int, a list of ints, or null."""
    if isinstance(value, bool):  # bool is an int subclass; a bool here is a broken config
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _pick_chat_template(value: Any) -> str | None:
    """tokenizer_config's `chat_template` is a string or named templates; prefer "default".

    The named form (a list of {name, template}) is how checkpoints ship extra templates such as
    "tool_use"; plain chat uses the default one, and the first one stands in when none is named so.
    """
    if isinstance(value, str):
        return value
    named: dict[str, str] = {}
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and isinstance(item.get("template"), str):
                named.setdefault(str(item.get("name", "")), item["template"])
    elif isinstance(value, Mapping):
        named = {str(k): v for k, v in value.items() if isinstance(v, str)}
    if not named:
        return None
    return named.get("default", next(iter(named.values())))


def _has_decoder(spec: Any, kind: str) -> bool:
    """Whether a tokenizer.json decoder spec (possibly a nested Sequence) contains `kind`."""
    if isinstance(spec, Mapping):
        if spec.get("type") == kind:
            return True
        return any(_has_decoder(d, kind) for d in spec.get("decoders") or [])
    return False


# --------------------------------------------------------------------------------------------
# Chat templates (rendered in `chat_template`'s sandbox)
# --------------------------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """Copy chat data down to JSON types before a template sees it.

    The sandbox blocks private attributes but not the public methods of arbitrary objects, so only
    plain data crosses into the template.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str subclasses (enums) carry extra methods; keep the text only
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    raise UsageError(
        f"{where} may only hold strings, numbers, booleans, lists and objects, "
        f"not a {type(value).__name__}."
    )


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """A checkpoint's tokenizer plus the facts generation needs (BOS/EOS ids, chat template).

    Encoding never runs the tokenizer.json post-processor: BOS is added here, from one explicit
    flag, so it can never be added twice (once by the post-processor, once by a chat template).
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool | None = None,
        extra_eos_ids: Iterable[int] = (),
        fallback_bos_id: int | None = None,
        chat_template: str | None = None,
        byte_fallback: bool = False,
    ) -> None:
        """Wrap a loaded `tokenizers.Tokenizer`; `from_dir` is the usual way in.

        `add_bos=None` means "whatever the post-processor would have done". `extra_eos_ids` come
        first in `eos_ids` (generation_config lists the ids the model really stops on).
        """
        self._tok = backend
        # A tokenizer.json may carry truncation/padding settings from training; a prompt must be
        # encoded whole and unpadded, and the context-length check belongs to the caller.
        self._tok.no_truncation()
        self._tok.no_padding()

        added = self._tok.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, tok in added.items() if tok.special)
        self.vocab_size: int = max(
            [self._tok.get_vocab_size(with_added_tokens=False), *(i + 1 for i in added)]
        )

        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.unk_token = unk_token
        self.chat_template: str | None = chat_template

        bos_id = self.token_to_id(bos_token) if bos_token is not None else None
        if bos_id is None:
            bos_id = fallback_bos_id
        # What would the post-processor put in front? Compare with and without special tokens on
        # a probe text; a leading extra token is the post-processor's BOS.
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        without = self._tok.encode("a", add_special_tokens=False).ids
        post_bos = None
        if len(with_special) > len(without) and with_special[1 : 1 + len(without)] == without:
            post_bos = with_special[0]
        if bos_id is None and post_bos is not None:
            bos_id = post_bos
        # Templates write `{{ bos_token }}`, and that text must encode back to `bos_id`.
        if bos_id is not None and (bos_token is None or self.token_to_id(bos_token) != bos_id):
            self.bos_token = self.id_to_token(bos_id)
        self.bos_id: int | None = bos_id
        if add_bos is None:
            add_bos = post_bos is not None and post_bos == bos_id
        # Nothing to add without a BOS token; keeping the flag True would only mislead callers.
        self.add_bos: bool = bool(add_bos) and bos_id is not None

        eos_ids: list[int] = []
        eos_id = self.token_to_id(eos_token) if eos_token is not None else None
        for i in [*extra_eos_ids, *([eos_id] if eos_id is not None else [])]:
            if i not in eos_ids:
                eos_ids.append(i)
        self.eos_ids: list[int] = eos_ids

        # ByteFallback decoders turn a run of <0xNN> tokens into text only once the whole run is
        # known (one invalid byte turns the run into U+FFFD per byte), so the streaming decoder
        # must know which ids those are.
        self._byte_token_ids: frozenset[int] = frozenset()
        if byte_fallback:
            vocab = self._tok.get_vocab(with_added_tokens=False)
            self._byte_token_ids = frozenset(
                i for tok, i in vocab.items() if _BYTE_TOKEN_RE.fullmatch(tok)
            )

        self._template_cache: tuple[str, jinja2.Template] | None = None

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load the tokenizer files of a checkpoint directory.

        tokenizer.json is required; tokenizer_config.json and generation_config.json are optional
        (a bare tokenizer still encodes), but a present-and-corrupt file is an error rather than
        silently defaulted, because wrong BOS/EOS ids produce garbage generations.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint directory.")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"The checkpoint at {path} has no tokenizer.json.")
        try:
            raw = tok_file.read_text(encoding="utf-8")
            spec = json.loads(raw)
            backend = _HFTokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
            raise CheckpointError(
                f"{tok_file} is corrupt or not a tokenizers file ({one_line(str(exc))})."
            ) from exc

        config = read_json(path / "tokenizer_config.json", required=False)
        gen_config = read_json(path / "generation_config.json", required=False)

        # Newer transformers saves the template as its own file; it wins over the config key
        # because transformers itself prefers it when both exist.
        chat_template = _pick_chat_template(config.get("chat_template"))
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            try:
                chat_template = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{template_file} is not readable ({exc}).") from exc

        add_bos = config.get("add_bos_token")
        bos_fallback = _int_list(gen_config.get("bos_token_id"))
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            unk_token=_token_content(config.get("unk_token")),
            add_bos=add_bos if isinstance(add_bos, bool) else None,
            extra_eos_ids=_int_list(gen_config.get("eos_token_id")),
            fallback_bos_id=bos_fallback[0] if bos_fallback else None,
            chat_template=chat_template if chat_template else None,
            byte_fallback=_has_decoder(spec.get("decoder"), "ByteFallback"),
        )

    # ---------------------------------------------------------------- ids and text

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (added tokens included), or None if it is not in the vocab."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The raw token string of an id (e.g. "Ġworld", "▁world", "<0xE2>"), or None."""
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a special added token (what `skip_special` drops)."""
        return token_id in self._special_ids

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are parsed as such.

        `bos=None` follows `self.add_bos`. BOS is not added when the text already starts with it
        (a chat template that writes `{{ bos_token }}`), and EOS is never added: this encodes
        prompts that generation continues from.
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if bos is None else bos
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        """Text of `ids`, exactly as the tokenizer's decoder produces it.

        No "clean up tokenization spaces" pass: it rewrites what the model wrote (" ," -> ",",
        which breaks code) and cannot be applied to a stream without retracting text.
        """
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # ---------------------------------------------------------------- chat templates

    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ChatTemplateError(
                "This checkpoint has no chat template, so it cannot format a conversation; "
                "send a raw prompt instead."
            )
        if self._template_cache is None or self._template_cache[0] != self.chat_template:
            compiled = compile_template(self.chat_template)
            self._template_cache = (self.chat_template, compiled)
        return self._template_cache[1]

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        system: str | None = None,
    ) -> str:
        """Render a conversation into the prompt text the model was trained on.

        `system` is prepended as a system message unless the conversation already has one. The
        template runs in an immutable jinja2 sandbox with the helpers Hub templates expect,
        under time, memory and size limits; every failure (template bug, template refusing
        the conversation, sandbox violation, a limit) surfaces as one `ChatTemplateError`.
        """
        template = self._compiled_template()
        if not isinstance(messages, list | tuple):
            raise UsageError("A conversation must be a list of messages.")
        for message in messages:
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise UsageError("Each chat message must be an object with a string 'role'.")
        # A message key set to None is dropped, as transformers does: templates test
        # `'tool_calls' in message` and would otherwise render "None" (API clients send
        # `"tool_calls": null`). Nested values are kept as they are, since tool arguments may
        # legitimately be null.
        msgs = [
            {k: v for k, v in _plain(m, "Chat messages").items() if v is not None} for m in messages
        ]
        if system is not None and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system})

        context: dict[str, Any] = {
            "messages": msgs,
            "add_generation_prompt": add_generation_prompt,
            "tools": None,
            "documents": None,
        }
        # Only the special tokens the checkpoint defines: a template testing `bos_token is
        # defined` must see the truth, and an undefined one renders as "" anyway.
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(self, name)
            if value is not None:
                context[name] = value

        return render(template, context)

    def encode_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        system: str | None = None,
    ) -> list[int]:
        """Render and encode a conversation. BOS follows `add_bos` but is not doubled when the
        template already wrote it (most templates with a BOS write `{{ bos_token }}` first)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, system=system
        )
        return self.encode(text)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces for streaming.

    Decoding one token at a time is wrong in three ways: a byte-level token can hold half of a
    UTF-8 character, SentencePiece decoders drop the leading space of the first token they see,
    and ByteFallback decoders only know the text of a run of `<0xNN>` tokens once the run ends.
    So each push decodes a small sliding window: `ids[prefix:read]` was already emitted and is
    decoded again only as context; the text that `ids[prefix:]` adds on top of it is emitted once
    it is stable (it does not end in U+FFFD and no byte run is still open).

    Invariant: the concatenation of all pieces plus `flush()` equals
    `tokenizer.decode(all_ids, skip_special=skip_special)` exactly. The price, for byte-fallback
    tokenizers only, is that a run of `<0xNN>` tokens is held until a non-byte token ends it: the
    decoder turns a whole run into U+FFFDs when any byte in it is invalid, so even a complete
    character inside an unfinished run may still change.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        # Only ids from `prefix` on are kept: earlier ones can never affect future pieces, and a
        # long generation should not keep (and re-decode) its whole history.
        self._ids: list[int] = []
        self._read = 0  # ids[:read] (relative to the kept window) are already emitted
        self._prefix_text: str | None = None  # cached decode of ids[:read]
        self._open_byte_run = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly stable text ("" while it is held back)."""
        self._ids.append(token_id)
        skipped = self._skip_special and self._tokenizer.is_special(token_id)
        if not skipped:
            # A skipped special token is removed before the decoder runs, so it does not end a
            # byte run: the bytes on both sides of it are still decoded together.
            self._open_byte_run = token_id in self._tokenizer._byte_token_ids
        if self._open_byte_run:
            return ""

        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[: self._read])
        prefix_text = self._prefix_text
        new_text = self._decode(self._ids)
        if (
            len(new_text) > len(prefix_text)
            and not new_text.endswith(_REPLACEMENT_CHAR)
            and new_text.startswith(prefix_text)
        ):
            piece = new_text[len(prefix_text) :]
            # The ids just emitted become the next window's context: enough for the decoder to
            # see what precedes the next token (a space-eating SentencePiece decoder, for one).
            del self._ids[: self._read]
            self._read = len(self._ids)
            self._prefix_text = None
            return piece
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation, decoded as-is (an incomplete
        character becomes U+FFFD, as in `Tokenizer.decode`). Call once, at the end."""
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[: self._read])
        piece = self._decode(self._ids)[len(self._prefix_text) :]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = None
        self._open_byte_run = False
        return piece


class StopMatcher:
    """Holds back streamed text that could still turn into one of the stop strings, so a stop
    string split across tokens never leaks into the output.

    Generation stops at the first stop string to *complete*; when several complete at the same
    character, the one that starts earliest wins. Whatever arrives after it is dropped.
    """

    def __init__(self, stops: list[str]) -> None:
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise UsageError("Stop strings must be non-empty text.")
        self._stops = list(dict.fromkeys(stops))  # dedupe, keep order
        self._buffer = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been seen (further pushes return nothing)."""
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, whether a stop string completed)."""
        if self._stopped:
            return "", True
        buffer = self._buffer + text
        # The held-back buffer contains no complete stop (it would have fired already), so any
        # match now ends inside the new text; pick the one that completes first.
        best: tuple[int, int] | None = None  # (end, start)
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best):
                best = (start + len(stop), start)
        if best is not None:
            self._stopped = True
            self._buffer = ""
            return buffer[: best[1]], True

        hold = self._longest_partial(buffer)
        self._buffer = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string:
        exactly the text that a future push could still complete into a stop."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of generation (no stop found), the held-back text; "" after a stop."""
        held, self._buffer = self._buffer, ""
        return "" if self._stopped else held
