"""safetensors: the header parser (torch-free, used by `parrot list` too) and the
memory-mapped loader, on generated headers and on mutated copies of a real file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parrot_cli.checkpoint.info import read_safetensors_header
from parrot_cli.checkpoint.store import _write_safetensors, load_safetensors
from tests.fuzz.conftest import clean, examples

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64", "", "f32"]
EDGE = [0, 1, 2, -1, -2, 2**31, 2**32, 2**53, 2**63, 2**64, 10**30]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                        st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=12)


@st.composite
def entry(draw: st.DrawFn, data_size: int) -> object:
    """A tensor entry: usually well-formed with plausible numbers, sometimes anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_value)
    shape = draw(st.lists(st.one_of(st.integers(0, 8), st.sampled_from(EDGE), json_scalar), max_size=4))
    start = draw(st.one_of(st.integers(0, data_size), st.sampled_from(EDGE), json_scalar))
    end = draw(st.one_of(st.integers(0, data_size), st.sampled_from(EDGE), json_scalar))
    offsets = draw(st.one_of(st.just([start, end]), st.lists(st.integers(0, data_size), max_size=3)))
    dtype = draw(st.one_of(st.sampled_from(DTYPES), json_scalar))
    if draw(st.booleans()) and all(type(d) is int for d in shape) and type(start) is int:
        # Offsets that agree with the shape and dtype, so the checks after the size check run.
        numel = 1
        for d in shape:
            numel *= d
        offsets = [start, start + numel * SIZES.get(dtype, 4)]
    out = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if draw(st.booleans()):
        out.pop(draw(st.sampled_from(sorted(out))))
    return out


@st.composite
def safetensors_file(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(max_size=128))
    names = draw(st.lists(st.sampled_from(["w", "b", "transformer.wte.weight", "__metadata__", "", "x" * 40]),
                          max_size=4, unique=True))
    table = {name: draw(entry(len(data))) for name in names}
    raw = json.dumps(table).encode()
    if draw(st.booleans()):
        raw += b" " * (-len(raw) % 8)
    length = draw(st.one_of(st.just(len(raw)), st.sampled_from([0, 1, 7, len(raw) + 1, 2**32, 2**63, 2**64 - 1])))
    return struct.pack("<Q", length % 2**64) + raw + data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("st-fuzz") / "case.safetensors"


def load_everything(path: Path) -> None:
    for tensor in load_safetensors(path).values():
        tensor.float().sum() if tensor.numel() else None


@given(blob=safetensors_file())
@examples(ci=400)
def test_generated_safetensors_read_cleanly(scratch: Path, blob: bytes) -> None:
    scratch.write_bytes(blob)
    clean("safetensors: generated header, parser", lambda: read_safetensors_header(scratch))
    clean("safetensors: generated header, loader", lambda: load_everything(scratch))


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "real.safetensors"
    g = torch.Generator().manual_seed(0)
    _write_safetensors(path, [("a", torch.randn(4, 8, generator=g)), ("b", torch.arange(6, dtype=torch.int64)),
                              ("c", torch.randn(3, generator=g).to(torch.bfloat16))])
    return path.read_bytes()


@given(flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 400)))
@examples(ci=300)
def test_mutated_safetensors_read_cleanly(scratch: Path, real: bytes, flips, cut) -> None:
    data = bytearray(real)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if cut is not None:
        del data[cut:]
    scratch.write_bytes(bytes(data))
    clean("safetensors: mutated file, loader", lambda: load_everything(scratch))
