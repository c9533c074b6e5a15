"""Tests for parrot_cli.tokenizer against real tokenizers (no mocks).

Two kinds of tokenizer are exercised because they fail in different ways when streamed:
* SmolLM2's byte-level BPE (GPT-2 style), loaded from the real GGUF through transformers, which
  also serves as the reference for encode/decode and chat templates;
* SentencePiece-style BPE with byte fallback, trained here in a few milliseconds, in both decoder
  flavours seen on the Hub (the `Metaspace` decoder, and Llama's Replace/ByteFallback/Fuse/Strip).
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from parrot_cli.errors import CheckpointError, ParrotError, UsageError
from parrot_cli.tokenizer import ChatTemplateError, IncrementalDecoder, StopMatcher, Tokenizer

REPLACEMENT = "\ufffd"

TEXTS = [
    'def f(x):\n\treturn {"k": [x, x**2]}  # ok\n',
    "Family: 👩‍👩‍👧 and flags 🇯🇵, thumbs 👍🏽!",
    "Crème brûlée, naïve façade, Zoë, e\u0301 (combining)",
    "日本語のテキスト、中文文本和한국어",
    "  leading\n\n\n\ttabs   and   runs   \n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "Ünïcödé → ∑ x² ≤ ∞ … “quotes” — dash",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write `print(1)` in Python.\n\nThanks."},
    ],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "日本語は？"},
        {"role": "assistant", "content": "はい。"},
    ],
]


def stream(tokenizer: Tokenizer, ids: list[int], *, skip_special: bool = True) -> list[str]:
    """All pieces of an IncrementalDecoder run, flush included (as the last element)."""
    decoder = IncrementalDecoder(tokenizer, skip_special=skip_special)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


def truncate_at_stop(text: str, stops: list[str]) -> str:
    """Reference for StopMatcher: cut before the stop that completes first (earliest start on a
    tie), which is the only rule a streaming matcher can follow."""
    best: tuple[int, int] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0:
            cand = (start + len(stop), start)
            best = cand if best is None else min(best, cand)
    return text if best is None else text[: best[1]]


def run_matcher(chunks: list[str], stops: list[str]) -> str:
    matcher = StopMatcher(stops)
    out = []
    for chunk in chunks:
        piece, stopped = matcher.push(chunk)
        out.append(piece)
        if stopped:
            assert matcher.flush() == ""
            return "".join(out)
    return "".join(out) + matcher.flush()


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf: Path):
    """The transformers tokenizer built from the GGUF: the reference implementation."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )


@pytest.fixture(scope="module")
def smollm2_dir(hf_smollm2, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smollm2_tok")
    hf_smollm2.save_pretrained(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


_SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! Streaming text one token at a time is harder than it looks.",
    "café naïve résumé",
    "def add(a, b):\n    return a + b",
] * 10


def build_sp_tokenizer(style: str) -> HFTokenizer:
    """A tiny SentencePiece-style BPE with byte fallback.

    `limit_alphabet` keeps emoji, CJK and newlines out of the vocab so they go through <0xNN>
    byte tokens, the case that breaks naive streaming.
    """
    tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    else:  # Llama/Mistral: normalizer adds the spaces, decoder strips the first one
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        limit_alphabet=50,
        show_progress=False,
    )
    tok.train_from_iterator(_SP_CORPUS, trainer)
    # The trainer does not create byte tokens; SentencePiece models carry all 256.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    first = max(vocab.values()) + 1
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = first + b
    return HFTokenizer.from_str(json.dumps(spec))


def write_checkpoint(
    path: Path,
    backend: HFTokenizer,
    config: dict | None = None,
    generation: dict | None = None,
    jinja: str | None = None,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(backend.to_str())
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    if jinja is not None:
        (path / "chat_template.jinja").write_text(jinja)
    return path


SP_CONFIG = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True}


@pytest.fixture(scope="module", params=["metaspace", "llama"])
def sp_backend(request) -> HFTokenizer:
    return build_sp_tokenizer(request.param)


@pytest.fixture(scope="module")
def sp(sp_backend, tmp_path_factory) -> Tokenizer:
    path = write_checkpoint(tmp_path_factory.mktemp("sp"), sp_backend, SP_CONFIG)
    return Tokenizer.from_dir(path)


@pytest.fixture
def template_tokenizer(tmp_path):
    """Factory: a small SentencePiece checkpoint with the given chat template."""
    backend = build_sp_tokenizer("metaspace")

    def make(template, **extra) -> Tokenizer:
        config = {**SP_CONFIG, "chat_template": template, **extra}
        return Tokenizer.from_dir(write_checkpoint(tmp_path / "ckpt", backend, config))

    return make


# ------------------------------------------------------------------------------------------
# SmolLM2 (byte-level BPE) against transformers
# ------------------------------------------------------------------------------------------


@pytest.mark.smollm2
def test_smollm2_metadata(smollm2: Tokenizer, hf_smollm2) -> None:
    assert smollm2.vocab_size == len(hf_smollm2)
    assert smollm2.eos_ids == [2]
    assert isinstance(smollm2.eos_ids, list)
    assert smollm2.bos_id == hf_smollm2.bos_token_id
    # Neither tokenizer_config nor the post-processor asks for BOS, like transformers.
    assert smollm2.add_bos is False
    assert smollm2.chat_template  # saved as chat_template.jinja by transformers 5
    assert smollm2.token_to_id("<|im_end|>") == 2
    assert smollm2.id_to_token(2) == "<|im_end|>"
    assert smollm2.is_special(2)


@pytest.mark.smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_decode_match_transformers(smollm2: Tokenizer, hf_smollm2, text) -> None:
    ids = smollm2.encode(text)
    assert ids == hf_smollm2.encode(text, add_special_tokens=False)
    assert ids == hf_smollm2(text)["input_ids"]
    assert smollm2.decode(ids) == hf_smollm2.decode(ids) == text
    assert smollm2.decode(ids, skip_special=True) == hf_smollm2.decode(
        ids, skip_special_tokens=True
    )


@pytest.mark.smollm2
def test_smollm2_special_tokens_in_text_are_parsed(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>user")
    assert ids[0] == smollm2.token_to_id("<|im_start|>")
    assert smollm2.encode("", bos=True) == [smollm2.bos_id]


@pytest.mark.smollm2
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_smollm2_streaming_texts(smollm2: Tokenizer, text: str, skip_special: bool) -> None:
    ids = smollm2.encode(text)
    pieces = stream(smollm2, ids, skip_special=skip_special)
    full = smollm2.decode(ids, skip_special=skip_special)
    assert "".join(pieces) == full
    assert not any(REPLACEMENT in p for p in pieces)
    # Held-back text must be released as soon as it is complete, not only at flush.
    assert pieces[-1] == ""


@pytest.mark.smollm2
def test_smollm2_streaming_splits_multibyte_chars(smollm2: Tokenizer) -> None:
    """Emoji are several byte-level tokens: the partial ones must produce no text at all."""
    ids = smollm2.encode("👩‍👩‍👧")
    assert len(ids) > 1
    pieces = stream(smollm2, ids)
    assert "" in pieces[:-1]
    assert "".join(pieces) == "👩‍👩‍👧"


def _random_sequences(tokenizer: Tokenizer, byte_like: list[int], count: int, seed: int):
    """Random id sequences biased toward the hard cases: byte tokens, special tokens and runs of
    valid multi-byte text (whose tokens must be glued back together)."""
    rng = random.Random(seed)
    specials = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)][:8]
    snippets = [tokenizer.encode(t, bos=False) for t in TEXTS]
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 24):
            r = rng.random()
            if r < 0.35:
                ids.append(rng.choice(byte_like))
            elif r < 0.45:
                ids.append(rng.choice(specials))
            elif r < 0.75:
                snippet = rng.choice(snippets)
                start = rng.randrange(len(snippet))
                ids.extend(snippet[start : start + rng.randint(1, 6)])
            else:
                ids.append(rng.randrange(tokenizer.vocab_size))
        yield ids


@pytest.mark.smollm2
def test_smollm2_streaming_random_ids(smollm2: Tokenizer) -> None:
    # Byte-level BPE spells each raw byte as one single-character token.
    single_chars = [
        i
        for i in range(smollm2.vocab_size)
        if not smollm2.is_special(i) and len(smollm2.id_to_token(i) or "") == 1
    ]
    assert len(single_chars) > 200  # bytes that never occur in UTF-8 may be missing
    for ids in _random_sequences(smollm2, single_chars, 300, seed=1234):
        for skip in (True, False):
            pieces = stream(smollm2, ids, skip_special=skip)
            full = smollm2.decode(ids, skip_special=skip)
            assert "".join(pieces) == full, ids
            if REPLACEMENT not in full:
                assert not any(REPLACEMENT in p for p in pieces), ids


@pytest.mark.smollm2
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(
    smollm2: Tokenizer, hf_smollm2, messages, add_generation_prompt
) -> None:
    expected = hf_smollm2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    expected_ids = hf_smollm2.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm2.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(
        expected_ids
    )


@pytest.mark.smollm2
def test_smollm2_system_argument(smollm2: Tokenizer, hf_smollm2) -> None:
    user = [{"role": "user", "content": "Hi"}]
    with_system = [{"role": "system", "content": "Be brief."}, *user]
    assert smollm2.apply_chat_template(user, system="Be brief.") == (
        hf_smollm2.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    )
    # An explicit system message wins over the argument.
    assert smollm2.apply_chat_template(with_system, system="Ignored") == (
        smollm2.apply_chat_template(with_system)
    )
    # Without any system message SmolLM2's template inserts its default one.
    assert "SmolLM" in smollm2.apply_chat_template(user)


@pytest.mark.smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_decoder_and_stop_matcher_compose(smollm2: Tokenizer, text: str) -> None:
    rng = random.Random(text)
    ids = smollm2.encode(text)
    full = smollm2.decode(ids, skip_special=False)
    candidates = [["<|im_end|>"], ["\n\n"], ["zzz-never"]]
    for _ in range(8):  # substrings that usually straddle token boundaries
        start = rng.randrange(len(full))
        candidates.append([full[start : start + rng.randint(1, 5)], "never-there"])
    for stops in candidates:
        decoder = IncrementalDecoder(smollm2, skip_special=False)
        matcher = StopMatcher(stops)
        out, stopped = [], False
        for token_id in ids:
            piece, stopped = matcher.push(decoder.push(token_id))
            out.append(piece)
            if stopped:
                break
        if not stopped:
            piece, stopped = matcher.push(decoder.flush())
            out.append(piece)
            if not stopped:
                out.append(matcher.flush())
        assert "".join(out) == truncate_at_stop(full, stops), stops


# ------------------------------------------------------------------------------------------
# SentencePiece-style tokenizers (Metaspace / Llama decoders, byte fallback)
# ------------------------------------------------------------------------------------------


def test_sp_bos_handling(sp: Tokenizer) -> None:
    assert sp.bos_id == sp.token_to_id("<s>")
    assert sp.eos_ids == [sp.token_to_id("</s>")]
    assert sp.add_bos is True
    ids = sp.encode("Hello world")
    assert ids[0] == sp.bos_id and ids.count(sp.bos_id) == 1
    assert sp.encode("Hello world", bos=False) == ids[1:]
    # Text that already starts with BOS (a template writing {{ bos_token }}) gets no second one.
    with_bos = sp.encode("<s>Hello world")
    assert with_bos == sp.encode("<s>Hello world", bos=False)
    assert with_bos[0] == sp.bos_id and with_bos.count(sp.bos_id) == 1
    assert sp.decode(ids, skip_special=True) == "Hello world"


@pytest.fixture(scope="module")
def sp_reference(sp_backend) -> HFTokenizer:
    """The same SentencePiece tokenizer, used directly through `tokenizers` as the reference."""
    return HFTokenizer.from_str(sp_backend.to_str())


@pytest.mark.parametrize("text", TEXTS + ["Hello world, hello there!"])
def test_sp_encode_decode(sp: Tokenizer, sp_reference: HFTokenizer, text: str) -> None:
    ids = sp.encode(text, bos=False)
    assert ids == sp_reference.encode(text, add_special_tokens=False).ids
    assert sp.decode(ids) == sp_reference.decode(ids, skip_special_tokens=False)
    if not text.startswith(" "):
        # A Metaspace decoder cannot tell a leading space from the one it prepended itself.
        assert sp.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS + ["The quick brown fox jumps over the lazy dog."])
def test_sp_streaming_texts(sp: Tokenizer, text: str) -> None:
    ids = sp.encode(text)
    pieces = stream(sp, ids)
    assert "".join(pieces) == sp.decode(ids, skip_special=True)
    assert not any(REPLACEMENT in p for p in pieces)
    # Text is only left for flush when the ids end in a run of byte tokens (see below).
    if not sp.id_to_token(ids[-1]).startswith("<0x"):
        assert pieces[-1] == ""


def test_sp_streaming_keeps_word_spaces(sp: Tokenizer) -> None:
    """Decoding "▁over" alone gives "over"; in a stream it must come out as " over"."""
    word = next(
        i
        for i in range(sp.vocab_size)
        if (sp.id_to_token(i) or "").startswith("▁") and len(sp.id_to_token(i)) > 2
    )
    spelled = sp.id_to_token(word).replace("▁", " ")
    assert sp.decode([word]) == spelled[1:]  # the decoder eats the space of a first token
    ids = sp.encode("fox", bos=False)
    pieces = stream(sp, [*ids, word])
    assert pieces[-2:] == [spelled, ""]
    assert "".join(pieces) == "fox" + spelled


def test_sp_streaming_random_ids(sp: Tokenizer) -> None:
    byte_ids = [sp.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    # Valid multi-byte characters spelled as byte tokens, so byte runs also decode cleanly.
    for ch in "é中👍":
        byte_ids.extend(sp.token_to_id(f"<0x{b:02X}>") for b in ch.encode())
    for ids in _random_sequences(sp, byte_ids, 300, seed=99):
        for skip in (True, False):
            pieces = stream(sp, ids, skip_special=skip)
            full = sp.decode(ids, skip_special=skip)
            assert "".join(pieces) == full, ids
            if REPLACEMENT not in full:
                assert not any(REPLACEMENT in p for p in pieces), ids


def test_sp_byte_run_is_held_until_it_ends(sp: Tokenizer) -> None:
    """ByteFallback decodes a whole run of byte tokens at once, and a later invalid byte turns
    the run into U+FFFDs, so "€" must not be emitted while the run could still continue."""
    euro = [sp.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    stray = sp.token_to_id("<0x80>")
    word = sp.encode("fox", bos=False)
    ids = [*word, *euro, stray, *word]
    pieces = stream(sp, ids)
    assert "".join(pieces) == sp.decode(ids, skip_special=True)
    assert "€" not in "".join(pieces)


def test_post_processor_bos_is_detected_and_not_doubled(sp_backend, tmp_path) -> None:
    backend = HFTokenizer.from_str(sp_backend.to_str())
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    config = {"bos_token": "<s>", "eos_token": "</s>"}  # no add_bos_token
    tok = Tokenizer.from_dir(write_checkpoint(tmp_path / "ckpt", backend, config))
    assert tok.add_bos is True
    assert tok.encode("Hello") == backend.encode("Hello").ids
    assert tok.encode("<s>Hello").count(bos) == 1
    # An explicit add_bos_token wins over the post-processor.
    config["add_bos_token"] = False
    tok = Tokenizer.from_dir(write_checkpoint(tmp_path / "ckpt", backend, config))
    assert tok.add_bos is False and bos not in tok.encode("Hello")


def test_eos_ids_union(sp_backend, tmp_path) -> None:
    eos = sp_backend.token_to_id("</s>")
    path = write_checkpoint(
        tmp_path / "a", sp_backend, SP_CONFIG, generation={"eos_token_id": [7, eos, 9]}
    )
    assert Tokenizer.from_dir(path).eos_ids == [7, eos, 9]
    path = write_checkpoint(tmp_path / "b", sp_backend, SP_CONFIG, generation={"eos_token_id": 5})
    assert Tokenizer.from_dir(path).eos_ids == [5, eos]
    path = write_checkpoint(tmp_path / "c", sp_backend, {}, generation={"bos_token_id": 1})
    tok = Tokenizer.from_dir(path)
    assert tok.eos_ids == [] and tok.bos_id == 1 and tok.add_bos is False


def test_missing_and_corrupt_files(sp_backend, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text('{"truncated": ')
    with pytest.raises(CheckpointError, match="corrupt"):
        Tokenizer.from_dir(tmp_path)
    path = write_checkpoint(tmp_path / "x", sp_backend)
    (path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(path)


# ------------------------------------------------------------------------------------------
# Chat template helpers and sandbox
# ------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "héllo <b>"}]


def test_template_basics_and_bos_not_doubled(template_tokenizer) -> None:
    tok = template_tokenizer(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
        "{% if tools is none %}no-tools{% endif %}"
    )
    text = tok.apply_chat_template(USER)
    assert text == "<s>[user] héllo <b></s>[assistant] no-tools"
    assert tok.apply_chat_template(USER, add_generation_prompt=False) == (
        "<s>[user] héllo <b></s>no-tools"
    )
    ids = tok.encode_chat(USER)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.apply_chat_template(USER, system="sys").startswith("<s>[system] sys</s>")


def test_template_tojson_and_strftime(template_tokenizer) -> None:
    tok = template_tokenizer(
        "{{ messages | tojson }}|{{ {'b': 1, 'a': 'é'} | tojson(indent=2, sort_keys=True) }}"
        "|{{ strftime_now('%Y') }}"
    )
    plain, indented, year = tok.apply_chat_template(USER).split("|")
    # HF semantics: no HTML escaping of "<", no \\u escapes for non-ASCII.
    assert plain == '[{"role": "user", "content": "héllo <b>"}]'
    assert indented == '{\n  "a": "é",\n  "b": 1\n}'
    assert int(year) in {datetime.date.today().year, datetime.date.today().year + 1}


def test_template_loopcontrols_generation_tag_and_namespace(template_tokenizer) -> None:
    tok = template_tokenizer(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% endfor %}{{ ns.n }}"
    )
    two = [*USER, {"role": "assistant", "content": "second"}]
    assert tok.apply_chat_template(two) == "héllo <b>1"


def test_raise_exception_surfaces_message(template_tokenizer) -> None:
    tok = template_tokenizer(
        "{% if messages[0].role != 'system' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError) as info:
        tok.apply_chat_template(USER)
    assert str(info.value) == (
        "The chat template rejected the conversation: "
        "Conversation roles must alternate user/assistant."
    )
    assert isinstance(info.value, ParrotError)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{% set ns = namespace() %}{{ ns.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
    ],
)
def test_sandbox_escape_is_refused(template_tokenizer, template) -> None:
    tok = template_tokenizer(template)
    with pytest.raises(ChatTemplateError) as info:
        tok.apply_chat_template(USER)
    assert "\n" not in str(info.value)
    if "__class__" in template:
        assert "sandbox forbids" in str(info.value)


def test_template_errors_are_one_sentence(template_tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match=r"syntax error on line 2") as info:
        template_tokenizer("ok\n{% for m in messages %}").apply_chat_template(USER)
    assert "\n" not in str(info.value)
    with pytest.raises(ChatTemplateError, match="undefined"):
        template_tokenizer("{{ no_such_function() }}").apply_chat_template(USER)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        template_tokenizer("{{ messages[0].content + 1 }}").apply_chat_template(USER)


def test_no_template(template_tokenizer) -> None:
    tok = template_tokenizer(None)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(USER)
    with pytest.raises(ChatTemplateError):
        tok.encode_chat(USER)


def test_template_sources(sp_backend, tmp_path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    path = write_checkpoint(tmp_path / "a", sp_backend, {**SP_CONFIG, "chat_template": named})
    assert Tokenizer.from_dir(path).apply_chat_template(USER) == "plain"
    # A chat_template.jinja file (what transformers 5 writes) is used, and wins over the key.
    path = write_checkpoint(
        tmp_path / "b", sp_backend, {**SP_CONFIG, "chat_template": "key"}, jinja="file"
    )
    assert Tokenizer.from_dir(path).apply_chat_template(USER) == "file"


def test_bad_messages_are_usage_errors(template_tokenizer) -> None:
    tok = template_tokenizer("{{ messages | length }}")
    with pytest.raises(UsageError):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(UsageError):
        tok.apply_chat_template([{"role": "user", "content": object()}])
    # None-valued message keys are dropped, as transformers does; nested nulls are kept.
    tok = template_tokenizer("{{ 'tool_calls' in messages[0] }} {{ messages[0].x | tojson }}")
    message = {"role": "user", "tool_calls": None, "x": {"a": None}}
    assert tok.apply_chat_template([message]) == 'False {"a": null}'
    assert message["tool_calls"] is None  # the caller's messages are not modified


# ------------------------------------------------------------------------------------------
# StopMatcher
# ------------------------------------------------------------------------------------------

STOP_CASES = [
    ("Hello world. User: next", ["User:"]),
    ("The answer is 42\n\nQuestion", ["\n\n", "Question"]),
    ("###start of text", ["###"]),  # stop at the very start
    ("aab", ["ab"]),  # overlapping prefix: the first "a" is not part of the stop
    ("aaab", ["aab"]),
    ("abcabd", ["abd"]),
    ("xabcd", ["abcd", "c"]),  # "c" completes first
    ("xbcd", ["bcd", "cd"]),  # both complete at "d": the earlier start wins
    ("no stop in here at all", ["STOP", "zz"]),
    ("ends with a partial sto", ["stop"]),
    ("emoji 👩‍👩‍👧 stop 👩‍👩‍👧", ["👩‍👩‍👧 stop"]),
    ("", ["x"]),
]


@pytest.mark.parametrize(("text", "stops"), STOP_CASES)
def test_stop_matcher_every_split(text: str, stops: list[str]) -> None:
    expected = truncate_at_stop(text, stops)
    assert run_matcher([text], stops) == expected
    for i in range(len(text) + 1):
        assert run_matcher([text[:i], text[i:]], stops) == expected, i
    assert run_matcher(list(text), stops) == expected
    for i in range(len(text) + 1):  # three pieces, every pair of cut points
        for j in range(i, len(text) + 1):
            assert run_matcher([text[:i], text[i:j], text[j:]], stops) == expected, (i, j)


def test_stop_matcher_holds_back_only_possible_stops() -> None:
    matcher = StopMatcher(["ab"])
    assert matcher.push("a") == ("", False)
    assert matcher.push("a") == ("a", False)
    assert matcher.push("b") == ("", True)
    assert matcher.stopped
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""

    matcher = StopMatcher(["world"])
    assert matcher.push("hello wor") == ("hello ", False)
    assert matcher.flush() == "wor"

    matcher = StopMatcher(["END"])
    assert matcher.push("text after END is dropped") == ("text after ", True)


def test_stop_matcher_random_chunkings() -> None:
    rng = random.Random(7)
    alphabet = "ab c\n"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in "xy"]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 5))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run_matcher(chunks, stops) == truncate_at_stop(text, stops), (text, stops, chunks)


def test_stop_matcher_rejects_empty_stop() -> None:
    with pytest.raises(UsageError):
        StopMatcher(["ok", ""])
    matcher = StopMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""
