"""GGUF: the header validator and the whole reader path a conversion takes (metadata, config,
tokenizer, every tensor dequantized), on mutated copies of a valid tiny file and on headers
generated field by field."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parrot_cli.checkpoint.gguf import read_gguf, validate_gguf_header
from parrot_cli.config import Config
from tests.fuzz.conftest import clean, examples
from tests.test_gguf import TinySpec, write_tiny_gguf

# Integers that break length and count fields: zero, one, sign bits, all ones, sizes near
# the file's, and huge products.
EDGE_INTS = [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A valid tiny llama GGUF (Q8_0 weights, so dequantization runs) and its header size."""
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    write_tiny_gguf(path, TinySpec(weight_type=gguf.GGMLQuantizationType.Q8_0, n_layers=1, hidden=32,
                                   n_heads=2, n_kv_heads=1, ffn=64))
    return path.read_bytes(), int(gguf.GGUFReader(path).data_offset)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-fuzz") / "case.gguf"


def read_everything(path: Path) -> None:
    """What `parrot convert` does with a GGUF file, short of writing the checkpoint."""
    from tokenizers import Tokenizer

    model = read_gguf(path)
    Config.from_hf(model.hf_config, name="fuzz")
    Tokenizer.from_str(model.tokenizer_json)
    for _name, tensor in model.tensors():
        tensor.sum()


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("u32"), st.integers(0, 10**9), st.sampled_from(EDGE_INTS)),
    st.tuples(st.just("u64"), st.integers(0, 10**9), st.sampled_from(EDGE_INTS)),
    st.tuples(st.just("cut"), st.integers(0, 10**9), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.integers(1, 64)),
    st.tuples(st.just("delete"), st.integers(0, 10**9), st.integers(1, 64)),
)


def mutate(data: bytes, header: int, steps: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in steps:
        # Mostly inside the header (where lengths and counts live), sometimes anywhere.
        span = header if where % 4 else len(out)
        pos = where % max(span, 1)
        if kind == "flip" and pos < len(out):
            out[pos] ^= value
        elif kind == "u32":
            out[pos : pos + 4] = struct.pack("<I", value % 2**32)
        elif kind == "u64":
            out[pos : pos + 8] = struct.pack("<Q", value % 2**64)
        elif kind == "cut":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = bytes((pos * 31 + i) % 256 for i in range(value))
        elif kind == "delete":
            del out[pos : pos + value]
    return bytes(out)


@given(steps=st.lists(mutation, min_size=1, max_size=4))
@examples(ci=250)
def test_mutated_gguf_reads_cleanly(base: tuple[bytes, int], scratch: Path, steps) -> None:
    data, header = base
    scratch.write_bytes(mutate(data, header, steps))
    clean("gguf: mutated file, whole read path", lambda: read_everything(scratch))


# ------------------------------------------------------------------ generated headers

def _string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@st.composite
def value(draw: st.DrawFn) -> bytes:
    """A typed metadata value, honest or lying about its lengths."""
    kind = draw(st.sampled_from([*_SCALARS, 8, 9, 13, 99]))
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        raw = draw(st.binary(min_size=struct.calcsize(fmt), max_size=struct.calcsize(fmt)))
        return struct.pack("<I", kind) + raw
    if kind == 8:
        text = draw(st.binary(max_size=16))
        length = draw(st.one_of(st.just(len(text)), st.sampled_from(EDGE_INTS)))
        return struct.pack("<IQ", 8, length) + text
    if kind == 9:
        item = draw(st.sampled_from([*_SCALARS, 8, 9, 42]))
        count = draw(st.one_of(st.integers(0, 6), st.sampled_from(EDGE_INTS)))
        body = draw(st.binary(max_size=48))
        return struct.pack("<IIQ", 9, item, count) + body
    return struct.pack("<I", kind) + draw(st.binary(max_size=8))


KEYS = [b"general.architecture", b"general.alignment", b"llama.block_count", b"llama.embedding_length",
        b"llama.attention.head_count", b"tokenizer.ggml.tokens", b"tokenizer.ggml.model", b"k", b""]


@st.composite
def tensor_info(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from([b"token_embd.weight", b"output_norm.weight", b"t", b"\xff\xfe"]))
    dims = draw(st.lists(st.one_of(st.integers(0, 64), st.sampled_from(EDGE_INTS)), min_size=0, max_size=5))
    n_dims = draw(st.one_of(st.just(len(dims)), st.sampled_from(EDGE_INTS[:8])))
    qtype = draw(st.one_of(st.sampled_from([int(t) for t in gguf.GGMLQuantizationType]), st.integers(0, 2**32 - 1)))
    offset = draw(st.one_of(st.sampled_from([0, 32, 64, 96]), st.sampled_from(EDGE_INTS)))
    return (_string(name) + struct.pack("<I", n_dims) + b"".join(struct.pack("<Q", d % 2**64) for d in dims)
            + struct.pack("<IQ", qtype % 2**32, offset % 2**64))


@given(
    version=st.sampled_from([1, 2, 3, 3, 3, 2**24, 2**32 - 1]),
    kvs=st.lists(st.tuples(st.sampled_from(KEYS), value()), max_size=6),
    tensors=st.lists(tensor_info(), max_size=4),
    counts=st.tuples(st.one_of(st.none(), st.sampled_from(EDGE_INTS)), st.one_of(st.none(), st.sampled_from(EDGE_INTS))),
    data=st.binary(max_size=256),
)
@examples(ci=250)
def test_generated_headers_read_cleanly(scratch: Path, version, kvs, tensors, counts, data) -> None:
    n_tensors = len(tensors) if counts[0] is None else counts[0]
    n_kv = len(kvs) if counts[1] is None else counts[1]
    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    header += b"".join(_string(k) + v for k, v in kvs) + b"".join(tensors)
    header += bytes(-len(header) % 32)
    scratch.write_bytes(header + data)
    clean("gguf: generated header, validator", lambda: validate_gguf_header(scratch))
    clean("gguf: generated header, whole read path", lambda: read_everything(scratch))
