"""Validating a GGUF header before anything trusts it.

`gguf.GGUFReader` trusts every length field it reads: a few crafted bytes make it loop with
unbounded memory growth or fail with raw IndexError/ValueError. `validate_gguf_header`
walks the whole header itself with bounds checks (counts, string and array lengths, value
types, tensor shapes and offsets against the file size) and raises one readable
`CheckpointError`, so the reader only ever sees a header that is sane.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from parrot_cli.errors import CheckpointError

# --------------------------------------------------------------------------------------------
# Limits for the header walk. They are far above anything a real model needs (a 400B model has
# ~2k tensors and ~40 KV pairs; the largest vocabularies have ~260k tokens) and far below what
# would let a crafted file exhaust memory or time.
# --------------------------------------------------------------------------------------------
MAX_TENSORS = 1_000_000
MAX_KV_PAIRS = 100_000
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_ARRAY_LEN = 50_000_000
# gguf.GGUFReader builds a numpy view per array element (~8 us and ~700 bytes each), so the
# total across all arrays bounds its time and memory: 4M elements is ~30 s and ~3 GB. The biggest
# real vocabularies need < 1M (Gemma 3: 262k tokens, scores and types; Llama 3: 128k tokens,
# types and 280k merges).
MAX_TOTAL_ARRAY_ELEMENTS = 4_000_000
MAX_TENSOR_NAME_BYTES = 4096
MAX_DIMS = 4
# ggml counts elements in int64; anything near that cannot describe a real tensor.
MAX_TENSOR_ELEMENTS = 2**62

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# magic + version + tensor count + KV count
_FIXED_HEADER_BYTES = 4 + 4 + 8 + 8
# Smallest possible encodings, used to reject impossible counts before walking them.
_MIN_KV_BYTES = 8 + 4 + 1  # key length (empty key), value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = (
    8 + 4 + 8 + 4 + 8
)  # name length (empty name), n_dims, one dim, type, offset

# GGUF value types (gguf.GGUFValueType) and the byte size of the fixed-size ones.
_TYPE_STRING = int(gguf.GGUFValueType.STRING)
_TYPE_ARRAY = int(gguf.GGUFValueType.ARRAY)
_SCALAR_SIZES: dict[int, int] = {
    int(gguf.GGUFValueType.UINT8): 1,
    int(gguf.GGUFValueType.INT8): 1,
    int(gguf.GGUFValueType.UINT16): 2,
    int(gguf.GGUFValueType.INT16): 2,
    int(gguf.GGUFValueType.UINT32): 4,
    int(gguf.GGUFValueType.INT32): 4,
    int(gguf.GGUFValueType.FLOAT32): 4,
    int(gguf.GGUFValueType.BOOL): 1,
    int(gguf.GGUFValueType.UINT64): 8,
    int(gguf.GGUFValueType.INT64): 8,
    int(gguf.GGUFValueType.FLOAT64): 8,
}
_INT_TYPES = frozenset(
    int(t)
    for t in (
        gguf.GGUFValueType.UINT8,
        gguf.GGUFValueType.INT8,
        gguf.GGUFValueType.UINT16,
        gguf.GGUFValueType.INT16,
        gguf.GGUFValueType.UINT32,
        gguf.GGUFValueType.INT32,
        gguf.GGUFValueType.UINT64,
        gguf.GGUFValueType.INT64,
    )
)
_FLOAT_TYPES = frozenset({int(gguf.GGUFValueType.FLOAT32), int(gguf.GGUFValueType.FLOAT64)})
_BOOL_TYPE = int(gguf.GGUFValueType.BOOL)

# ============================================================================================
# Header validation
# ============================================================================================


class _HeaderWalker:
    """Bounds-checked little-endian reads over a memory-mapped file.

    Every read checks that it stays inside the file, so a lying length field becomes a clear
    "truncated" error instead of a huge allocation or an out-of-range read.
    """

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid GGUF file: {message}.")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path} is truncated: {what} at byte {self.pos} needs {n} bytes but the "
                f"file has {max(self.size - self.pos, 0)} left."
            )

    def u32(self, what: str) -> int:
        self._need(4, what)
        (value,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self._need(8, what)
        (value,) = struct.unpack_from("<Q", self.buf, self.pos)
        self.pos += 8
        return int(value)

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def string_length(self, what: str, limit: int) -> int:
        length = self.u64(f"the length of {what}")
        if length > limit:
            raise self.fail(f"{what} claims {length} bytes (the limit is {limit})")
        return length

    def read_string(self, what: str, limit: int) -> str:
        length = self.string_length(what, limit)
        self._need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} at byte {self.pos - length} is not valid UTF-8") from err

    def skip_string(self, what: str) -> None:
        length = self.string_length(what, MAX_STRING_BYTES)
        self.skip(length, what)


def _skip_value(walker: _HeaderWalker, value_type: int, what: str) -> int:
    """Step over one metadata value and return its array length (0 for a scalar).

    Numeric arrays are skipped with one seek; string arrays must be walked string by string.
    """
    if value_type in _SCALAR_SIZES:
        walker.skip(_SCALAR_SIZES[value_type], what)
        return 0
    if value_type == _TYPE_STRING:
        walker.skip_string(what)
        return 0
    if value_type == _TYPE_ARRAY:
        item_type = walker.u32(f"the element type of {what}")
        count = walker.u64(f"the length of {what}")
        if count > MAX_ARRAY_LEN:
            raise walker.fail(f"{what} claims {count} elements (the limit is {MAX_ARRAY_LEN})")
        if item_type in _SCALAR_SIZES:
            walker.skip(count * _SCALAR_SIZES[item_type], what)
        elif item_type == _TYPE_STRING:
            # Each element is at least its 8-byte length: reject impossible counts before looping.
            walker._need(count * 8, what)
            for _ in range(count):
                walker.skip_string(f"an element of {what}")
        elif item_type == _TYPE_ARRAY:
            # llama.cpp does not accept nested arrays either; no real model uses them.
            raise walker.fail(f"{what} is an array of arrays, which GGUF readers do not support")
        else:
            raise walker.fail(f"{what} has unknown element type {item_type}")
        return count
    raise walker.fail(f"{what} has unknown value type {value_type}")


def _walk_metadata(walker: _HeaderWalker, n_kv: int) -> int:
    """Walk the key/value section; return the data alignment it declares (or the default)."""
    alignment = _DEFAULT_ALIGNMENT
    seen: set[str] = set()
    total_elements = 0
    for index in range(n_kv):
        key = walker.read_string(f"metadata key #{index}", MAX_STRING_BYTES)
        if key in seen:
            raise walker.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        value_type = walker.u32(f"the type of metadata {key!r}")
        if key == "general.alignment":
            if value_type != int(gguf.GGUFValueType.UINT32):
                raise walker.fail("general.alignment is not a uint32")
            alignment = walker.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise walker.fail(f"general.alignment {alignment} is not a power of two")
        else:
            total_elements += _skip_value(walker, value_type, f"metadata {key!r}")
            if total_elements > MAX_TOTAL_ARRAY_ELEMENTS:
                raise walker.fail(
                    f"its metadata arrays hold over {MAX_TOTAL_ARRAY_ELEMENTS} elements in all, "
                    "far more than any model's vocabulary needs"
                )
    return alignment


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    n_bytes: int
    offset: int


def _read_tensor_info(walker: _HeaderWalker, index: int, alignment: int) -> _TensorInfo:
    """Read one tensor description and check its shape, type and offset are plausible."""
    name = walker.read_string(f"the name of tensor #{index}", MAX_TENSOR_NAME_BYTES)
    n_dims = walker.u32(f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise walker.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    dims = [walker.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims)]
    n_elements = 1
    for dim in dims:
        # Checked one factor at a time so the product never gets astronomically large.
        if dim == 0 or dim > MAX_TENSOR_ELEMENTS:
            raise walker.fail(f"tensor {name!r} has an invalid dimension {dim}")
        n_elements *= dim
        if n_elements > MAX_TENSOR_ELEMENTS:
            raise walker.fail(f"tensor {name!r} has an impossible element count")
    raw_type = walker.u32(f"the type of tensor {name!r}")
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError) as err:
        raise walker.fail(f"tensor {name!r} has unknown data type {raw_type}") from err
    if dims[0] % block_size:
        raise walker.fail(
            f"tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
            f"{ggml_type.name} block size {block_size}"
        )
    offset = walker.u64(f"the data offset of tensor {name!r}")
    if offset % alignment:
        raise walker.fail(f"tensor {name!r} data offset {offset} is not {alignment}-byte aligned")
    return _TensorInfo(name=name, n_bytes=n_elements // block_size * type_size, offset=offset)


def _check_counts(walker: _HeaderWalker, n_tensors: int, n_kv: int) -> None:
    if n_tensors > MAX_TENSORS:
        raise walker.fail(f"it claims {n_tensors} tensors (the limit is {MAX_TENSORS})")
    if n_kv > MAX_KV_PAIRS:
        raise walker.fail(f"it claims {n_kv} metadata entries (the limit is {MAX_KV_PAIRS})")
    minimum = n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES
    if walker.pos + minimum > walker.size:
        raise CheckpointError(
            f"{walker.path} is truncated: its header lists {n_kv} metadata entries and "
            f"{n_tensors} tensors, which cannot fit in {walker.size} bytes."
        )


def _walk_header(walker: _HeaderWalker) -> None:
    magic = bytes(walker.buf[0:4])
    if magic != _MAGIC:
        raise walker.fail(f"it starts with {magic!r} instead of {_MAGIC!r}")
    walker.pos = 4
    version = walker.u32("the version")
    if version not in _SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in _SUPPORTED_VERSIONS:
            raise walker.fail("it is a big-endian GGUF file; only little-endian ones are supported")
        raise walker.fail(f"it has format version {version}; versions 2 and 3 are supported")
    n_tensors = walker.u64("the tensor count")
    n_kv = walker.u64("the metadata count")
    _check_counts(walker, n_tensors, n_kv)

    alignment = _walk_metadata(walker, n_kv)
    infos: list[_TensorInfo] = []
    names: set[str] = set()
    for index in range(n_tensors):
        info = _read_tensor_info(walker, index, alignment)
        if info.name in names:
            raise walker.fail(f"tensor {info.name!r} appears twice")
        names.add(info.name)
        infos.append(info)

    data_start = -(-walker.pos // alignment) * alignment  # round up to the alignment
    for info in infos:
        end = data_start + info.offset + info.n_bytes
        if end > walker.size:
            raise CheckpointError(
                f"{walker.path} is truncated: tensor {info.name} needs {end - walker.size} bytes "
                f"past the end of the file."
            )


def validate_gguf_header(path: Path) -> None:
    """Check a GGUF file's whole header before any trusting parser sees it.

    Walks magic, version, counts, every metadata entry and every tensor description with bounds
    checks, then checks each tensor's data lies inside the file. Only the header is read (through
    a memory map), so this is fast even for multi-gigabyte files. Raises CheckpointError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < _FIXED_HEADER_BYTES:
                if size >= 4 and handle.read(4) != _MAGIC:
                    raise CheckpointError(f"{path} is not a GGUF file (wrong magic bytes).")
                raise CheckpointError(
                    f"{path} is truncated: {size} bytes is shorter than a GGUF header."
                )
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _walk_header(_HeaderWalker(buf, size, path))
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err.strerror or err}.") from err
