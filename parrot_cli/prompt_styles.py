"""How a conversation becomes prompt text: the checkpoint's chat template, or a built-in
prompt style for checkpoints that ship without one.

Older chat models (StableLM-tuned-alpha, RedPajama-INCITE-Chat, Falcon-instruct, Llama 2
chat) were released before tokenizers carried Jinja templates; their formats live only in
model cards. Each built-in style writes the format of its card, and lists the stop
sequences that end a reply (a special token written as text, e.g. "<|eot_id|>", stops on
that token's id; see `LLM.stream_ids`).

One rule every style keeps so that a chat can reuse its KV cache between turns: rendering
a longer conversation only appends to the rendering of a shorter one (earlier turns are
written the same way whatever follows them).

No torch here: `parrot chat --help` and the tokenizer paths import this module cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from parrot_cli.errors import UsageError

if TYPE_CHECKING:
    from parrot_cli.tokenizer import Tokenizer

Message = dict[str, str]

TEMPLATE = "template"  # the name of "the checkpoint's own chat template"

STABLELM_SYSTEM = """# StableLM Tuned (Alpha version)
- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.
- StableLM is excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.
- StableLM is more than just an information source, StableLM is also able to write poetry, short stories, and make jokes.
- StableLM will refuse to participate in anything that could harm a human.
"""


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """Prepend `system` as a system message unless the conversation already has one."""
    msgs = [dict(m) for m in messages]
    if system is not None and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _check(messages: list[Message]) -> None:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise UsageError("Chat messages need a role of system, user or assistant.")
        if not isinstance(m.get("content"), str):
            raise UsageError("Each chat message needs a text 'content'.")


class PromptStyle:
    """Turns chat messages into prompt text. Subclasses write one model family's format."""

    name: str = ""
    description: str = ""
    stop: tuple[str, ...] = ()  # sequences that end a reply, besides the model's EOS ids
    default_system: str | None = None

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        """Prompt text for `messages` (system first if any); with `add_generation_prompt`
        it ends where the assistant's reply begins."""
        _check(messages)
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if any(m["role"] == "system" for m in messages):
            raise UsageError("Only the first chat message may be a system message.")
        text = self.begin(system)
        for m in messages:
            text += self.user(m["content"]) if m["role"] == "user" else self.assistant(m["content"])
        if add_generation_prompt:
            text += self.reply_prefix()
        return text

    def encode(self, tokenizer: Tokenizer, messages: list[Message], system: str | None = None) -> list[int]:
        """Token ids of the rendered conversation (BOS as the tokenizer adds it, never twice)."""
        return tokenizer.encode(self.render(with_system(messages, system)))

    # The pieces of a format; `render` joins them.
    def begin(self, system: str | None) -> str:
        return system + "\n" if system else ""

    def user(self, content: str) -> str:
        raise NotImplementedError

    def assistant(self, content: str) -> str:
        raise NotImplementedError

    def reply_prefix(self) -> str:
        raise NotImplementedError


class TemplateStyle(PromptStyle):
    """The checkpoint's own Jinja chat template (rendered in the tokenizer's sandbox)."""

    name = TEMPLATE
    description = "the checkpoint's chat template"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


class StableLMAlpha(PromptStyle):
    """stabilityai/stablelm-tuned-alpha-*: <|SYSTEM|>...<|USER|>...<|ASSISTANT|>..."""

    name = "stablelm-alpha"
    description = "StableLM-tuned-alpha (<|SYSTEM|>, <|USER|>, <|ASSISTANT|>)"
    stop = ("<|SYSTEM|>", "<|USER|>", "<|ASSISTANT|>", "<|padding|>", "<|endoftext|>")
    default_system = STABLELM_SYSTEM

    def begin(self, system: str | None) -> str:
        return f"<|SYSTEM|>{system}" if system else ""

    def user(self, content: str) -> str:
        return f"<|USER|>{content}"

    def assistant(self, content: str) -> str:
        return f"<|ASSISTANT|>{content}"

    def reply_prefix(self) -> str:
        return "<|ASSISTANT|>"


class RedPajamaChat(PromptStyle):
    """togethercomputer/RedPajama-INCITE-Chat-*: "<human>: ...\\n<bot>: ..." turns."""

    name = "redpajama-chat"
    description = "RedPajama-INCITE-Chat (<human>: / <bot>:)"
    stop = ("<human>:",)

    def user(self, content: str) -> str:
        return f"<human>: {content}\n"

    def assistant(self, content: str) -> str:
        # The model writes " text\n" after "<bot>:"; a reply kept without that spacing
        # renders the same, so the conversation's tokens stay a prefix-extension.
        return f"<bot>: {content.strip()}\n"

    def reply_prefix(self) -> str:
        return "<bot>:"


class FalconInstruct(PromptStyle):
    """tiiuae/falcon-*-instruct: "User: ...\\nFalcon: ..." lines after an optional
    "System:" line (the format of the Falcon chat model cards)."""

    name = "falcon-instruct"
    description = "Falcon-instruct (System: / User: / Falcon:)"
    stop = ("\nUser:", "<|endoftext|>")

    def begin(self, system: str | None) -> str:
        return f"System: {system}\n" if system else ""

    def user(self, content: str) -> str:
        return f"User: {content}\n"

    def assistant(self, content: str) -> str:
        return f"Falcon: {content.strip()}\n"

    def reply_prefix(self) -> str:
        return "Falcon:"


class Llama2Chat(PromptStyle):
    """meta-llama/Llama-2-*-chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] reply </s>."""

    name = "llama2-chat"
    description = "Llama 2 chat ([INST] ... [/INST], <<SYS>>)"
    stop = ("</s>",)

    def render(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        _check(messages)
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        text = ""
        for i, m in enumerate(messages):
            if m["role"] == "user":
                content = m["content"].strip()
                if i == 0 and system:
                    content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
                text += f"<s>[INST] {content} [/INST]"
            elif m["role"] == "assistant":
                text += f" {m['content'].strip()} </s>"
            else:
                raise UsageError("Only the first chat message may be a system message.")
        return text


class Llama3(PromptStyle):
    """meta-llama/Meta-Llama-3-*-Instruct: header tokens and <|eot_id|> after each turn."""

    name = "llama3"
    description = "Llama 3 (<|start_header_id|> ... <|eot_id|>)"
    stop = ("<|eot_id|>", "<|end_of_text|>")

    def begin(self, system: str | None) -> str:
        text = "<|begin_of_text|>"
        return text + self._turn("system", system) if system else text

    def _turn(self, role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"

    def user(self, content: str) -> str:
        return self._turn("user", content)

    def assistant(self, content: str) -> str:
        return self._turn("assistant", content)

    def reply_prefix(self) -> str:
        return "<|start_header_id|>assistant<|end_header_id|>\n\n"


class ChatML(PromptStyle):
    """ChatML (<|im_start|>role ... <|im_end|>): Qwen, Hermes, SmolLM and many others."""

    name = "chatml"
    description = "ChatML (<|im_start|>role ... <|im_end|>)"
    stop = ("<|im_end|>",)

    def _turn(self, role: str, content: str) -> str:
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"

    def begin(self, system: str | None) -> str:
        return self._turn("system", system) if system else ""

    def user(self, content: str) -> str:
        return self._turn("user", content)

    def assistant(self, content: str) -> str:
        return self._turn("assistant", content)

    def reply_prefix(self) -> str:
        return "<|im_start|>assistant\n"


class Plain(PromptStyle):
    """A neutral "User:/Assistant:" transcript for base models with no chat format."""

    name = "plain"
    description = "plain transcript (User: / Assistant:), for base models"
    stop = ("\nUser:",)

    def user(self, content: str) -> str:
        return f"User: {content}\n"

    def assistant(self, content: str) -> str:
        return f"Assistant: {content.strip()}\n"

    def reply_prefix(self) -> str:
        return "Assistant:"


STYLES: dict[str, PromptStyle] = {
    s.name: s for s in (StableLMAlpha(), RedPajamaChat(), FalconInstruct(), Llama2Chat(), Llama3(), ChatML(), Plain())
}
STYLE_NAMES = (TEMPLATE, *STYLES)

# Checkpoint or model names -> style, for checkpoints without a template. First match wins.
_BY_NAME: tuple[tuple[str, str], ...] = (
    (r"stablelm-tuned-alpha", "stablelm-alpha"),
    (r"redpajama-incite.*chat", "redpajama-chat"),
    (r"falcon.*instruct", "falcon-instruct"),
    (r"llama-?2.*chat", "llama2-chat"),
    (r"llama-?3.*instruct", "llama3"),
    (r"chatml|smollm.*instruct|qwen|hermes", "chatml"),
)
# Tokens in the vocabulary that give the format away when the name does not.
_BY_VOCAB: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<|im_start|>", "<|im_end|>"), "chatml"),
    (("<|start_header_id|>", "<|eot_id|>"), "llama3"),
    (("<|USER|>", "<|ASSISTANT|>"), "stablelm-alpha"),
)


def style_for_names(names: Iterable[str]) -> PromptStyle | None:
    """The built-in style whose model a name refers to (None when no name matches)."""
    names = [n for n in names if n]
    for pattern, style in _BY_NAME:
        if any(re.search(pattern, n, re.IGNORECASE) for n in names):
            return STYLES[style]
    return None


def select_style(tokenizer: Tokenizer, *, names: Iterable[str] = (), override: str | None = None) -> PromptStyle:
    """The style for a checkpoint: `override` (--prompt-style) if given; else its chat
    template; else the built-in style its name or vocabulary points to; else `plain`."""
    if override is not None:
        key = override.strip().lower()
        if key == TEMPLATE:
            if tokenizer.chat_template is None:
                raise UsageError(
                    "This checkpoint has no chat template; choose a built-in --prompt-style: "
                    f"{', '.join(STYLES)}."
                )
            return TemplateStyle(tokenizer)
        if key not in STYLES:
            raise UsageError(f"Unknown prompt style {override!r}; choose one of {', '.join(STYLE_NAMES)}.")
        return STYLES[key]
    if tokenizer.chat_template is not None:
        return TemplateStyle(tokenizer)
    if (style := style_for_names(names)) is not None:
        return style
    for tokens, style_name in _BY_VOCAB:
        if all(tokenizer.token_to_id(t) is not None for t in tokens):
            return STYLES[style_name]
    return STYLES["plain"]
