"""Built-in prompt styles: golden renderings copied from each model's card, their stop
sequences, the prefix-extension rule a KV-reusing chat relies on, and style selection."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from parrot_cli.errors import UsageError
from parrot_cli.prompt_styles import STYLES, TemplateStyle, select_style, style_for_names
from parrot_cli.tokenizer import Tokenizer

# stabilityai/stablelm-tuned-alpha-7b model card, "Usage".
STABLELM_CARD = """<|SYSTEM|># StableLM Tuned (Alpha version)
- StableLM is a helpful and harmless open-source AI language model developed by StabilityAI.
- StableLM is excited to be able to help the user, but will refuse to do anything that could be considered harmful to the user.
- StableLM is more than just an information source, StableLM is also able to write poetry, short stories, and make jokes.
- StableLM will refuse to participate in anything that could harm a human.
<|USER|>What's your mood today?<|ASSISTANT|>"""

# meta-llama/Meta-Llama-3-8B-Instruct model card / Meta's "prompt format" page.
LLAMA3_CARD = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful AI assistant for travel tips and recommendations<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is France's capital?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBonjour! The capital of France is Paris!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat can I do there?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

GOLDEN = [
    # (style, messages, expected rendering, stop sequences from the card)
    (
        "stablelm-alpha",
        [{"role": "user", "content": "What's your mood today?"}],  # the card's default system prompt
        STABLELM_CARD,
        # the card's StopOnTokens ids [50278, 50279, 50277, 1, 0]
        {"<|USER|>", "<|ASSISTANT|>", "<|SYSTEM|>", "<|padding|>", "<|endoftext|>"},
    ),
    (
        "redpajama-chat",  # togethercomputer/RedPajama-INCITE-Chat-3B-v1 card
        [{"role": "user", "content": "Who is Alan Turing?"}],
        "<human>: Who is Alan Turing?\n<bot>:",
        {"<human>:"},
    ),
    (
        "falcon-instruct",  # tiiuae/falcon-180B-chat card: the Falcon chat format
        [
            {"role": "system", "content": "Add an optional system prompt here"},
            {"role": "user", "content": "This is the user input"},
            {"role": "assistant", "content": "This is what the model generates"},
            {"role": "user", "content": "This might be a second turn input"},
        ],
        "System: Add an optional system prompt here\nUser: This is the user input\n"
        "Falcon: This is what the model generates\nUser: This might be a second turn input\nFalcon:",
        {"\nUser:", "<|endoftext|>"},
    ),
    (
        "llama2-chat",  # meta-llama/Llama-2-7b-chat-hf, as the Hugging Face "Llama 2 is here" post gives it
        [
            {"role": "system", "content": "{{ system_prompt }}"},
            {"role": "user", "content": "{{ user_msg_1 }}"},
            {"role": "assistant", "content": "{{ model_answer_1 }}"},
            {"role": "user", "content": "{{ user_msg_2 }}"},
        ],
        "<s>[INST] <<SYS>>\n{{ system_prompt }}\n<</SYS>>\n\n{{ user_msg_1 }} [/INST] "
        "{{ model_answer_1 }} </s><s>[INST] {{ user_msg_2 }} [/INST]",
        {"</s>"},
    ),
    (
        "llama3",
        [
            {"role": "system", "content": "You are a helpful AI assistant for travel tips and recommendations"},
            {"role": "user", "content": "What is France's capital?"},
            {"role": "assistant", "content": "Bonjour! The capital of France is Paris!"},
            {"role": "user", "content": "What can I do there?"},
        ],
        LLAMA3_CARD,
        {"<|eot_id|>", "<|end_of_text|>"},
    ),
    (
        "chatml",  # OpenAI's ChatML document, as Qwen and Hermes cards show it
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello"},
        ],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n",
        {"<|im_end|>"},
    ),
]


@pytest.mark.parametrize("name,messages,expected,stops", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_rendering_and_stops(name, messages, expected, stops):
    style = STYLES[name]
    assert style.render(messages) == expected
    assert set(style.stop) == stops


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": " Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke.\nA short one."},
    {"role": "assistant", "content": "Why did the chicken cross the road?"},
    {"role": "user", "content": "Why?"},
]


@pytest.mark.parametrize("name", sorted(STYLES))
def test_longer_conversation_only_appends(name):
    """KV reuse needs turn N's rendering (prompt + reply) to be a prefix of turn N+1's."""
    style = STYLES[name]
    for end in (2, 4):  # after user message 1 and 2
        before = style.render(CONVERSATION[:end])
        after = style.render(CONVERSATION[: end + 2])
        assert after.startswith(before), (before, after)
        reply = CONVERSATION[end]["content"].strip()
        assert reply in after[len(before) :]


def test_system_handling():
    # Styles without a system slot put it first; a system message anywhere else is refused.
    assert STYLES["redpajama-chat"].render(CONVERSATION[:2]).startswith("Be brief.\n<human>: Hi there\n")
    assert STYLES["stablelm-alpha"].render(CONVERSATION[:2]).startswith("<|SYSTEM|>Be brief.<|USER|>Hi")
    with pytest.raises(UsageError, match="first chat message"):
        STYLES["chatml"].render([CONVERSATION[1], CONVERSATION[0]])
    with pytest.raises(UsageError, match="role"):
        STYLES["plain"].render([{"role": "tool", "content": "x"}])


def _tokenizer(special: list[str], template: str | None = None) -> Tokenizer:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["hello", "world"])}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    return Tokenizer(backend, chat_template=template)


def test_selection_order():
    plain = _tokenizer([])
    chatml_vocab = _tokenizer(["<|im_start|>", "<|im_end|>"])
    llama3_vocab = _tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    with_template = _tokenizer(["<|im_start|>", "<|im_end|>"], template="{{ messages[0]['content'] }}")

    # the checkpoint's template first, then the name, then the vocabulary, then plain
    assert isinstance(select_style(with_template, names=["falcon-7b-instruct"]), TemplateStyle)
    assert select_style(plain, names=["tiiuae/falcon-7b-instruct"]).name == "falcon-instruct"
    assert select_style(plain, names=["", "stablelm-tuned-alpha-3b"]).name == "stablelm-alpha"
    assert select_style(plain, names=["togethercomputer/RedPajama-INCITE-Chat-3B-v1"]).name == "redpajama-chat"
    assert select_style(plain, names=["Llama-2-7b-chat-hf"]).name == "llama2-chat"
    assert select_style(plain, names=["Meta-Llama-3-8B-Instruct"]).name == "llama3"
    assert select_style(chatml_vocab, names=["my-finetune"]).name == "chatml"
    assert select_style(llama3_vocab, names=["my-finetune"]).name == "llama3"
    assert select_style(plain, names=["pythia-160m"]).name == "plain"
    assert style_for_names(["RedPajama-INCITE-Base-3B-v1"]) is None  # a base model is not a chat model

    # --prompt-style overrides everything; bad names are usage errors that list the choices
    assert select_style(with_template, override="llama3").name == "llama3"
    assert select_style(with_template, override="template").name == "template"
    with pytest.raises(UsageError, match="chatml"):
        select_style(plain, override="vicuna")
    with pytest.raises(UsageError, match="no chat template"):
        select_style(plain, override="template")


def test_encode_never_doubles_bos():
    tok = _tokenizer(["<s>", "</s>"])
    tok.bos_id, tok.add_bos = tok.token_to_id("<s>"), True
    ids = STYLES["llama2-chat"].encode(tok, [{"role": "user", "content": "hello"}])
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


@pytest.mark.smollm2
def test_style_by_vocabulary_stops_on_a_special_token(smollm2_llm, smollm2_checkpoint, tmp_path):
    """A copy of SmolLM2 with no chat template and an EOS that is not <|im_end|>: the ChatML
    style is picked from its vocabulary, its stop "<|im_end|>" (a special token, never in
    the decoded text) stops the reply on its id, and the tokens equal the real template's."""
    from parrot_cli import LLM

    copy = tmp_path / "no-template"
    copy.mkdir()
    for name in ("parrot_config.json", "model.safetensors", "tokenizer.json"):
        (copy / name).symlink_to(smollm2_checkpoint / name)
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    config["eos_token"] = "<|endoftext|>"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    (copy / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [0]}))
    parrot_config = json.loads((smollm2_checkpoint / "parrot_config.json").read_text())
    parrot_config["config"]["eos_token_id"] = [0]
    (copy / "parrot_config.json").unlink()
    (copy / "parrot_config.json").write_text(json.dumps(parrot_config))
    llm = LLM.load(copy, precision="32-true", device="cpu")
    assert llm.chat_style().name == "chatml" and 2 not in llm.eos_ids

    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
    messages = [{"role": "user", "content": "Say hi."}]
    assert llm.encode_prompt(messages, system) == smollm2_llm.encode_prompt(messages)
    stream = llm.stream(messages, system=system, temperature=0, max_new_tokens=40)
    reply = "".join(stream)
    assert stream.result.finish_reason == "stop" and stream.result.token_ids[-1] == 2
    assert reply == smollm2_llm.chat(messages, temperature=0, max_new_tokens=40)
    shutil.rmtree(copy)
