"""ChatSession on the real SmolLM2 model: the KV cache is reused between turns (asserted by
token counts), and every reply equals what a fresh model given the whole conversation
produces (greedy). No terminal here; the REPL has its own tests."""

from __future__ import annotations

import copy
import json

import pytest

from parrot_cli.api import LLM
from parrot_cli.chat import ChatSession, common_prefix
from parrot_cli.errors import ContextLengthError, UsageError
from parrot_cli.prompt_styles import TemplateStyle

pytestmark = pytest.mark.smollm2

GREEDY = {"temperature": 0, "max_new_tokens": 8}


def fresh_reply(llm, session: ChatSession, messages, **sampling) -> str:
    """A reply computed from scratch: the whole conversation prefilled from position 0."""
    ids = session.style.encode(llm.tokenizer, messages)
    return "".join(llm.stream_ids(ids, **{**GREEDY, **sampling}))


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_turns_prefill_only_new_tokens_and_match_a_fresh_model(smollm2_llm, hf_tokenizer):
    session = ChatSession(smollm2_llm, overrides=GREEDY)
    assert session.style.name == "template"
    prompts = ["I have a cat called Tom.", "What is my cat called?", "Thanks! Bye."]
    cached: list[int] = []
    renders = []
    for prompt in prompts:
        turn = session.send(prompt)
        ids = session.encode(session.conversation())
        reply = "".join(turn)
        stats = turn.stats
        # The previous prompt + the reply as generated is a prefix of this turn's prompt:
        # only the end-of-turn tokens, the new message and the generation prompt are new.
        assert ids[: len(cached)] == cached
        assert stats.rewound == 0
        assert stats.reused == len(cached)
        assert stats.prefilled == len(ids) - len(cached) == stats.result.prompt_tokens
        cached = ids + stats.result.token_ids[:-1]
        renders.append((list(session.messages[:-1]), reply))
    assert "Tom" in renders[1][1]  # turn 2 answers from turn 1

    # The rendered prompt is transformers' apply_chat_template, text and tokens.
    conversation = session.conversation()
    expected = hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert smollm2_llm.tokenizer.apply_chat_template(conversation) == expected
    assert session.encode(conversation) == hf_tokenizer(expected, add_special_tokens=False).input_ids

    # Each reply equals a fresh model's reply to the conversation up to it (greedy).
    for messages, reply in renders:
        assert fresh_reply(smollm2_llm, session, messages) == reply
    # ... and turn 2 needs turn 1: alone, the question does not bring up Tom.
    alone = [{"role": "user", "content": prompts[1]}]
    assert "Tom" not in fresh_reply(smollm2_llm, session, alone)


def test_template_that_rewrites_earlier_turns_reprefills_from_the_first_difference(smollm2_llm):
    """A template that changes its first line every turn: no prefix-extension, so each turn
    recomputes from the first differing token (counted), and replies still match."""
    tokenizer = copy.copy(smollm2_llm.tokenizer)
    tokenizer.chat_template = (
        "<|im_start|>system\nThis conversation has {{ messages|length }} messages.<|im_end|>\n"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    session = ChatSession(smollm2_llm, overrides={**GREEDY, "max_new_tokens": 6})
    session.style = TemplateStyle(tokenizer)
    list(session.send("Hello!"))
    cached = session._cache_ids
    turn = session.send("How are you?")
    ids = session.encode(session.conversation())
    reply = "".join(turn)
    first_difference = common_prefix(cached, ids)
    assert 0 < first_difference < len(cached)
    assert turn.stats.reused == first_difference
    assert turn.stats.prefilled == len(ids) - first_difference
    assert turn.stats.rewound == len(cached) - first_difference
    assert reply == fresh_reply(smollm2_llm, session, session.conversation()[:-1], max_new_tokens=6)


def test_interrupted_reply_keeps_the_session(smollm2_llm):
    session = ChatSession(smollm2_llm, system="You are terse.", overrides={**GREEDY, "max_new_tokens": 30})
    turn = session.send("Count from one to twenty in words.")
    pieces = iter(turn)
    partial = next(pieces) + next(pieces)
    turn.close()  # what Ctrl-C does in the REPL
    assert turn.stats.interrupted
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    # The cache holds the prompt and the fed tokens; the next turn reuses them and is exact.
    turn = session.send("Thanks.")
    reply = "".join(turn)
    assert turn.stats.rewound == 0 and turn.stats.reused > 0
    assert reply == fresh_reply(smollm2_llm, session, session.conversation()[:-1], max_new_tokens=30)

    # Interrupted before any text: the message is dropped as if never sent.
    before = list(session.messages)
    session.send("Another one.").close()
    assert session.messages == before


def test_overflow_drops_oldest_exchanges_but_never_the_system_prompt(smollm2_llm):
    base = smollm2_llm
    small = LLM(base.model, base.tokenizer, base.config, base.checkpoint_dir, base.settings, base.device,
                base.precision, fixed_max_seq_length=80)
    session = ChatSession(small, system="You are terse.", overrides={**GREEDY, "max_new_tokens": 8})
    dropped = 0
    for prompt in ["Name a fruit.", "Name a colour.", "Name an animal.", "Name a city."]:
        turn = session.send(prompt)
        reply = "".join(turn)
        dropped += turn.stats.dropped
        ids = session.encode(session.conversation()[:-1])
        assert len(ids) + 8 <= 80
        assert turn.stats.prefilled == len(ids) - turn.stats.reused
        assert reply == fresh_reply(small, session, session.conversation()[:-1], max_new_tokens=8)
    assert dropped >= 1
    assert session.conversation()[0] == {"role": "system", "content": "You are terse."}
    assert session.messages[0]["role"] == "user" and session.messages[0]["content"] != "Name a fruit."
    # After trimming, the system prompt's tokens are still reused from the cache.
    assert turn.stats.reused > 0

    # A single message that cannot fit is one clear error, and the session is unchanged.
    before = list(session.messages)
    with pytest.raises(ContextLengthError, match="context window is 80"):
        session.send("word " * 200)
    assert session.messages == before


def test_commands_undo_regen_clear_set_and_transcripts(smollm2_llm, tmp_path):
    session = ChatSession(smollm2_llm, overrides={**GREEDY, "max_new_tokens": 4})
    first = "".join(session.send("Hi!"))
    again = session.regenerate()
    assert "".join(again) == first and again.stats.prefilled == 1  # greedy: the same reply, 1 token recomputed
    assert [m["role"] for m in session.messages] == ["user", "assistant"]

    session.set_option("top-k", "5")
    session.set_option("temperature", "0.7")
    assert ("top_k", 5, "/set") in session.settings()
    with pytest.raises(UsageError, match="temperature"):
        session.set_option("temperature", "-1")
    with pytest.raises(UsageError, match="Unknown setting"):
        session.set_option("quantize", "int8")
    session.set_option("temperature", "none")
    assert "temperature" not in session.overrides
    assert {n: s for n, _, s in session.settings()}["temperature"] == "default"

    path = session.save(tmp_path / "chats" / "a.json")
    data = json.loads(path.read_text())
    assert data["format"] == "parrot-chat" and data["messages"] == session.messages
    assert not list(path.parent.glob("*.partial"))

    assert session.undo() and session.messages == []
    assert not session.undo()
    session.load(path)
    assert session.messages == data["messages"] and session.overrides["top_k"] == 5
    session.clear()
    assert session.messages == []

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        session.load(bad)
    bad.write_text(json.dumps({"format": "parrot-chat", "messages": [{"role": "tool", "content": 1}]}))
    with pytest.raises(UsageError, match="not a parrot chat transcript"):
        session.load(bad)
    with pytest.raises(UsageError, match="No transcript"):
        session.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="empty"):
        session.send("   ")
