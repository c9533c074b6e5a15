"""Tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) and chat
template rendering: mutated files through `Tokenizer.from_dir`, encode, decode and the
streaming decoder; generated templates (pieces of real templates, sandbox escapes, and
operations that blow up time or memory) rendered over generated conversations."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parrot_cli.checkpoint.gguf import read_gguf
from parrot_cli.tokenizer import IncrementalDecoder, Tokenizer
from tests.fuzz.conftest import clean, examples
from tests.fuzz.test_fuzz_safetensors import json_value
from tests.test_gguf import CHAT_TEMPLATE, write_tiny_gguf


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real byte-level BPE tokenizer.json (the tiny GGUF's, 263 tokens) and its config."""
    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_gguf(path)
    model = read_gguf(path)
    return {"tokenizer.json": json.loads(model.tokenizer_json), "tokenizer_config.json": model.tokenizer_config}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tok-fuzz")


def mutate_json(draw: st.DrawFn, doc: Any, steps: int) -> Any:
    """Replace values at random paths of a JSON document (lists and objects alike)."""
    for _ in range(steps):
        node, path = doc, []
        while isinstance(node, dict | list) and node and draw(st.integers(0, 3)):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            path.append(key)
            node = node[key]
        value = draw(st.one_of(json_value, st.sampled_from([-1, 2**63, 10**6, "", "<|im_start|>", [], {}])))
        if not path:
            doc = value
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    return doc


@st.composite
def tokenizer_dir(draw: st.DrawFn, files: dict[str, Any]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, doc in files.items():
        doc = mutate_json(draw, json.loads(json.dumps(doc)), draw(st.integers(0, 3)))
        raw = json.dumps(doc).encode()
        if draw(st.integers(0, 6)) == 0:  # byte-level damage too
            rng = random.Random(draw(st.integers(0, 2**32)))
            raw = bytes(b ^ (rng.randint(1, 255) if rng.random() < 0.001 else 0) for b in raw)
        if draw(st.integers(0, 8)) == 0:
            raw = raw[: draw(st.integers(0, len(raw)))]
        out[name] = raw
    if draw(st.booleans()):
        out["generation_config.json"] = json.dumps({"eos_token_id": draw(json_value), "bos_token_id": draw(json_value)}).encode()
    return out


def use_tokenizer(directory: Path, ids: list[int]) -> None:
    tok = Tokenizer.from_dir(directory)
    text = "Hello <|im_start|>user\nthe thin inn<|im_end|> é 😀"
    encoded = tok.encode(text)
    tok.decode(encoded)
    decoder = IncrementalDecoder(tok)
    for i in [*encoded, *ids]:
        decoder.push(i)
    decoder.flush()
    if tok.chat_template is not None:
        tok.encode_chat([{"role": "user", "content": "hi"}])


@given(data=st.data(), ids=st.lists(st.integers(0, 600), max_size=8))
@examples(ci=200)
def test_mutated_tokenizer_files_load_cleanly(tokenizer_files, scratch: Path, data, ids) -> None:
    for name, raw in data.draw(tokenizer_dir(tokenizer_files)).items():
        (scratch / name).write_bytes(raw)
    clean("tokenizer files: load + encode/decode/stream", lambda: use_tokenizer(scratch, ids))
    (scratch / "generation_config.json").unlink(missing_ok=True)


# ------------------------------------------------------------------ chat templates

PIECES = [
    # what real templates do
    "{% for m in messages %}", "{% endfor %}", "{% if add_generation_prompt %}", "{% endif %}", "{% else %}",
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n", "{{ bos_token }}", "{{ eos_token }}",
    "{{ messages[0]['content'] | trim }}", "{{ m.content | upper }}", "{{ messages | length }}",
    "{% set ns = namespace(found=false) %}", "{% set ns.found = true %}", "{{ loop.index0 % 2 }}",
    "{{ messages | tojson }}", "{{ strftime_now('%d %b %Y') }}", "{{ dict(a=1) | tojson(indent=2) }}",
    "{{ raise_exception('Roles must alternate') }}", "{% generation %}x{% endgeneration %}", "{% break %}",
    "{{ messages | map(attribute='content') | join(', ') }}", "{{ (messages | last).role }}",
    # reaching for Python internals
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__.os }}",
    "{{ raise_exception.__globals__ }}", "{{ messages.append(1) }}", "{{ self.__dict__ }}",
    "{{ joiner.__init__.__globals__['__builtins__']['__import__']('os').system('true') }}",
    "{{ '{0.__class__}'.format(1) }}", "{{ namespace.__init__ }}", "{{ lipsum(1) }}",
    # time and memory
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**10 }}", "{{ [1] * 10**9 }}", "{{ 9 ** 9 ** 9 }}", "{{ '%999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}", "{{ 'a' | center(10**10) }}", "{{ 'a'.zfill(10**10) }}",
    "{{ 'a' | indent(10**9) }}", "{{ ('a' * 1000000) | replace('a', 'aaaaaaaaaa') }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "{{ range(10**9) | list }}",
    "{{ (['x' * 1000000] * 1000000) | join }}", "{{ messages | tojson(indent=10**9) }}",
    # broken syntax
    "{% for %}", "{{ }}", "{% endif %}", "{{ messages[", "{% set x = %}",
]


@st.composite
def template(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=6)), min_size=1, max_size=6))
    return "".join(parts)


message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]),
     "content": st.one_of(st.text(max_size=20), st.sampled_from(["{{ 7*7 }}", "<|im_end|>", ""]))},
    optional={"tool_calls": json_value, "name": st.text(max_size=5)},
)


@pytest.fixture(scope="module", autouse=True)
def tight_limits():
    """The render limits themselves are under test; tighter ones keep each case quick."""
    from parrot_cli import chat_template

    saved = chat_template.RENDER_SECONDS, chat_template.RENDER_MEMORY_BYTES
    chat_template.RENDER_SECONDS, chat_template.RENDER_MEMORY_BYTES = 0.5, 64 * 1024**2
    yield
    chat_template.RENDER_SECONDS, chat_template.RENDER_MEMORY_BYTES = saved


@pytest.fixture(scope="module")
def template_tokenizer(tokenizer_files, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tpl")
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_files["tokenizer.json"]))
    (d / "tokenizer_config.json").write_text(json.dumps({**tokenizer_files["tokenizer_config.json"],
                                                         "chat_template": CHAT_TEMPLATE}))
    return Tokenizer.from_dir(d)


@given(source=template(), messages=st.lists(message, max_size=4), system=st.one_of(st.none(), st.text(max_size=8)),
       prompt=st.booleans())
@examples(ci=400)
def test_generated_chat_templates_render_cleanly(template_tokenizer: Tokenizer, source, messages, system, prompt) -> None:
    template_tokenizer.chat_template = source

    def render() -> None:
        text = template_tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, system=system)
        assert isinstance(text, str)

    clean("chat template: compile + render", render)
