"""The `LLM` API on the real SmolLM2 model (converted from the GGUF once per session)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from parrot_cli import LLM
from parrot_cli.errors import ContextLengthError, UsageError

pytestmark = pytest.mark.smollm2

PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def hf_reference(smollm2_gguf: Path):
    """transformers loading the same GGUF: the numerical reference (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2_gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kwargs)
    return model.eval(), tokenizer


def test_greedy_continuation_matches_transformers(smollm2_llm, hf_reference):
    model, tokenizer = hf_reference
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :])
    assert smollm2_llm.tokenizer.encode(PROMPT) == ids[0].tolist()
    got = smollm2_llm.generate(PROMPT, max_new_tokens=32, temperature=0)
    assert got == expected
    assert got.startswith(" Alex, and I'm a professional coach.")


def test_logits_match_transformers(smollm2_llm, hf_reference):
    model, tokenizer = hf_reference
    text = "The capital of France is Paris. Le café est très bon! 東京 🦜"
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(smollm2_llm.logits(ids), expected, atol=1e-4, rtol=1e-4)


def test_stream_equals_generate_byte_for_byte(smollm2_llm):
    kwargs = {"max_new_tokens": 40, "temperature": 0.9, "top_k": 40, "seed": 7}
    pieces = list(smollm2_llm.stream("Once upon a time", **kwargs))
    assert len(pieces) > 5
    assert "".join(pieces) == smollm2_llm.generate("Once upon a time", **kwargs)


def test_seed_reproducibility(smollm2_llm):
    kwargs = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 0}
    a = smollm2_llm.generate("My favourite food is", seed=1, **kwargs)
    b = smollm2_llm.generate("My favourite food is", seed=1, **kwargs)
    c = smollm2_llm.generate("My favourite food is", seed=2, **kwargs)
    assert a == b
    assert a != c


def test_stop_string_split_across_tokens_never_leaks(smollm2_llm):
    full = smollm2_llm.generate(PROMPT, max_new_tokens=16, temperature=0)
    # "I'm a prof" spans several tokens ("'m", " a", " professional").
    stream = smollm2_llm.stream(PROMPT, max_new_tokens=16, temperature=0, stop=["I'm a prof"])
    text = "".join(stream)
    assert text == full[: full.index("I'm a prof")]
    assert stream.result.finish_reason == "stop"


def test_every_eos_id_stops(smollm2_llm, smollm2_checkpoint, tmp_path):
    """generation_config's eos_token_id is a list; each id in it ends generation."""
    greedy = smollm2_llm.stream(PROMPT, max_new_tokens=8, temperature=0)
    list(greedy)
    third = greedy.result.token_ids[2]
    copy = tmp_path / "ckpt"
    shutil.copytree(smollm2_checkpoint, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, third]
    (copy / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM.load(copy, precision="32-true", device="cpu")
    stream = llm.stream(PROMPT, max_new_tokens=8, temperature=0)
    text = "".join(stream)
    assert stream.result.finish_reason == "eos"
    assert stream.result.generated_tokens == 3
    assert stream.result.token_ids == greedy.result.token_ids[:3]
    assert text == smollm2_llm.tokenizer.decode(greedy.result.token_ids[:2])


def test_kv_cache_allocated_once_and_reused(smollm2_llm):
    smollm2_llm.generate("One", max_new_tokens=4, temperature=0)
    cache = smollm2_llm.model.transformer.h[0].attn.kv_cache
    pointer = cache.k.data_ptr()
    for prompt in ("Two", "Three four five"):
        smollm2_llm.generate(prompt, max_new_tokens=4, temperature=0)
    assert smollm2_llm.model.transformer.h[0].attn.kv_cache.k.data_ptr() == pointer


def test_chat_uses_the_template(smollm2_llm):
    messages = [{"role": "user", "content": "What is 2+2? Answer with a number."}]
    ids = smollm2_llm.encode_prompt(messages)
    rendered = smollm2_llm.tokenizer.decode(ids)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    reply = smollm2_llm.chat(messages, max_new_tokens=12, temperature=0)
    assert "4" in reply
    assert "<|im_end|>" not in reply  # the end-of-turn token is an EOS id, never text


def test_perplexity_is_sane(smollm2_llm):
    text = (
        "The sun rises in the east and sets in the west. Every morning, people wake up, "
        "drink coffee and go to work."
    )
    ppl = smollm2_llm.perplexity(text)
    assert 1.0 < ppl < 60.0
    assert smollm2_llm.perplexity("qwv zxx plorb grunk vrrt") > ppl


def test_prompt_longer_than_context_is_an_error(smollm2_llm):
    too_long = "hello " * (smollm2_llm.config.block_size + 10)
    with pytest.raises(ContextLengthError, match="context window"):
        smollm2_llm.generate(too_long, max_new_tokens=1)


def test_fixed_cache_limits_the_prompt(smollm2_checkpoint):
    llm = LLM.load(smollm2_checkpoint, precision="32-true", max_seq_length=16)
    with pytest.raises(ContextLengthError, match="max-seq-length"):
        llm.generate("word " * 20, max_new_tokens=1)
    stream = llm.stream("Hi there", max_new_tokens=100, temperature=0)
    list(stream)
    # the cache is the limit: prompt + generated tokens fit in 16 positions
    assert stream.result.prompt_tokens + stream.result.generated_tokens <= 16


def test_a_split_that_cannot_work_fails_before_loading(smollm2_checkpoint):
    with pytest.raises(UsageError, match="9 attention heads do not split over 2 devices; use --strategy sequential"):
        LLM.load(smollm2_checkpoint, strategy="tp", devices=2)


def test_bad_sampling_values_are_usage_errors(smollm2_llm):
    with pytest.raises(UsageError):
        smollm2_llm.generate("x", temperature=-1)
    with pytest.raises(UsageError):
        smollm2_llm.generate("x", top_p=0)


def test_bf16_keeps_the_greedy_reference(smollm2_checkpoint, smollm2_llm):
    """bf16 (the CPU default where it is native) starts with the same greedy tokens (the
    reference has a near-tie at token 6, so only the first five are compared)."""
    llm = LLM.load(smollm2_checkpoint, precision="bf16-true")
    assert llm.model.transformer.wte.weight.dtype == torch.bfloat16
    expected = smollm2_llm.generate(PROMPT, max_new_tokens=5, temperature=0)
    assert llm.generate(PROMPT, max_new_tokens=5, temperature=0) == expected == " Alex, and I'm"


def test_multibyte_text_streams_whole_characters(smollm2_llm):
    prompt = "Emoji and Japanese: 🦜🦜 こんにちは、世界。さようなら、"
    stream = smollm2_llm.stream(prompt, max_new_tokens=24, temperature=0)
    pieces = list(stream)
    # this greedy run emits katakana, then stops inside an emoji (the length limit):
    # the half character is dropped, never printed as U+FFFD
    assert smollm2_llm.tokenizer.decode(stream.result.token_ids).endswith("\ufffd")
    assert pieces and all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == smollm2_llm.generate(prompt, max_new_tokens=24, temperature=0)


def test_large_cache_is_announced(smollm2_checkpoint, monkeypatch):
    import parrot_cli.api as api

    monkeypatch.setattr(api, "CACHE_NOTICE_BYTES", 1)
    llm = LLM.load(smollm2_checkpoint, precision="32-true")
    notices = []
    llm.notify = notices.append
    llm.generate("Hi", max_new_tokens=2, temperature=0)
    assert len(notices) == 1 and "KV cache" in notices[0] and "256 tokens" in notices[0]
