"""The parrot checkpoint directory: writing it atomically, reading it memory-mapped.

Layout (see DESIGN.md): parrot_config.json, model.safetensors (or model-0000N-of-0000M
shards + model.safetensors.index.json), tokenizer.json, tokenizer_config.json,
generation_config.json.

A checkpoint is built in a sibling `NAME.partial/` and renamed into place only when every
file is written and `parrot_config.json` (written last) records their checksums: an
interrupted write leaves the previous checkpoint or nothing, never a half one.

Reading maps the safetensors files into memory (copy-on-write) and builds tensors on the
mapping, so loading costs no second copy of the weights; the header is validated first so
a truncated or corrupt file is one clear error, not a crash.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from parrot_cli import __version__
from parrot_cli.checkpoint.info import (  # noqa: F401 (re-exported: the format's names)
    CONFIG_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    WEIGHTS_FILE,
    CheckpointInfo,
    read_info,
    read_safetensors_header,
    sha256_file,
    weight_files,
)
from parrot_cli.config import Config
from parrot_cli.quantize.qconfig import QUANT_CONFIG_FILE, QuantizationConfig

SHARD_BYTES = 4 * 1024**3  # shard above this, as HF does, so no single file is huge
# Header space reserved in front of each shard's data: ~500 tensor entries. A longer
# header costs one streamed copy of the shard on disk, never memory.
HEADER_RESERVE = 64 * 1024
HEADER_ENTRY_BYTES = 160  # a generous estimate of one tensor's header entry

Progress = Callable[[int, int, str], None]  # (done, total, what)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# --------------------------------------------------------------------------- reading


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors backed by a private (copy-on-write) memory map of the file: no copy in RAM."""
    path = Path(path)
    table, base = read_safetensors_header(path)
    out: dict[str, torch.Tensor] = {}
    if not any(k != "__metadata__" for k in table):
        return out
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        count = (end - start) // dtype.itemsize
        if count == 0:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start)
        out[name] = t.view(entry["shape"])
    return out


def load_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(checkpoint_dir):
        state.update(load_safetensors(path))
    return state


# --------------------------------------------------------------------------- writing


def _header(entries: list[tuple[str, torch.dtype, list[int], int, int]]) -> bytes:
    """The safetensors header (JSON) for tensors at the given data offsets."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, start, end in entries:
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [start, end]}
    return json.dumps(header, separators=(",", ":")).encode()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # A byte view works for every dtype (numpy has no bfloat16).
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class _ShardFile:
    """One safetensors file written as its tensors arrive, so a converter never holds a
    shard in memory: the data goes to disk right after a reserved header area, and the
    header is written into that space when the file is closed (padded with spaces, which
    the format allows). A header that outgrows the reservation (thousands of tensors) is
    written in front of a streamed copy of the data instead."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = reserve
        self.entries: list[tuple[str, torch.dtype, list[int], int, int]] = []
        self.nbytes = 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.file.seek(8 + reserve)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            self.file.write(_tensor_bytes(tensor))
        self.entries.append((name, tensor.dtype, list(tensor.shape), self.nbytes, self.nbytes + nbytes))
        self.nbytes += nbytes

    def close(self) -> None:
        raw = _header(self.entries)
        if len(raw) <= self.reserve:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserve) + raw + b" " * (self.reserve - len(raw)))
            self._finish(self.file)
            return
        self.file.close()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        moved = self.path.with_name(self.path.name + ".data")
        self.path.rename(moved)
        with open(moved, "rb") as src, open(self.path, "wb") as dst:
            dst.write(struct.pack("<Q", len(raw)) + raw)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, 16 * 1024**2)
            self._finish(dst)
        moved.unlink()

    @staticmethod
    def _finish(f: Any) -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def abandon(self) -> None:
        """Close without finishing. Closing flushes the buffered tail, which fails on a full
        disk: that error is the one already being handled, so it is dropped here (raising
        it would skip the removal of the partial directory)."""
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:
                pass


def _write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Write one safetensors file with a header exactly its size (tests write damaged or
    hand-made checkpoints with it)."""
    offset, entries = 0, []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        entries.append((name, t.dtype, list(t.shape), offset, offset + nbytes))
        offset += nbytes
    raw = _header(entries)
    raw += b" " * (-len(raw) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in tensors:
            if t.numel():
                f.write(_tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())


class CheckpointWriter:
    """Builds a checkpoint in `TARGET.partial/` and moves it into place on `commit()`.

    Tensors are written to disk as they are added (`_ShardFile`), so peak memory is the
    caller's one tensor, never a shard. Use as a context manager: leaving the block by an
    exception (Ctrl-C included) removes the partial directory, so the target keeps its
    previous content or stays absent.
    """

    def __init__(self, target: Path, *, shard_bytes: int | None = None, expected_tensors: int | None = None) -> None:
        """`expected_tensors` (an upper estimate) sizes the header space each shard reserves."""
        self.target = Path(target)
        self.partial = self.target.with_name(self.target.name + ".partial")
        self.shard_bytes = shard_bytes or SHARD_BYTES
        self.header_reserve = HEADER_RESERVE
        if expected_tensors is not None:
            self.header_reserve = -(-(HEADER_ENTRY_BYTES * expected_tensors + 256) // 8) * 8
        self._shard: _ShardFile | None = None
        self._shards: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.need = 0  # the bytes `require` said the checkpoint takes

    def require(self, need: int, what: str) -> None:
        """Refuse, before anything is written, a checkpoint of `need` bytes that its disk
        cannot hold (a DiskFullError with the numbers); a disk that fills up anyway
        (something else wrote) is reported the same way on leaving the writer."""
        from parrot_cli.resources import check_disk

        self.need = need
        check_disk(self.partial, need, what)

    def __enter__(self) -> CheckpointWriter:
        if self.partial.exists():  # left by a killed run: never reused
            shutil.rmtree(self.partial)
        old = self.target.with_name(self.target.name + ".old")
        if old.exists() and not self.target.exists():
            old.rename(self.target)  # a run killed mid-swap (no renameat2): the old state returns
        self.partial.mkdir(parents=True)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            try:
                if self._shard is not None:
                    self._shard.abandon()
            finally:
                if self.partial.exists():
                    shutil.rmtree(self.partial, ignore_errors=True)
            from parrot_cli.resources import disk_full_error, is_disk_full

            if is_disk_full(exc):  # the partial checkpoint is gone: say so, with the numbers
                raise disk_full_error(self.target.parent, self.need or self.total_bytes,
                                      f"writing {self.target}") from exc

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} was added twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard is not None and self._shard.entries and self._shard.nbytes + nbytes > self.shard_bytes:
            self._close_shard()
        if self._shard is None:
            name_on_disk = f"model-{len(self._shards) + 1:05d}.safetensors"
            self._shard = _ShardFile(self.partial / name_on_disk, self.header_reserve)
        self._shard.add(name, tensor)
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        shard, self._shard = self._shard, None
        shard.close()
        self._shards.append((shard.path.name, [e[0] for e in shard.entries]))

    def write_json(self, name: str, data: Any) -> None:
        (self.partial / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.partial / name).write_text(text)

    def commit(
        self,
        config: Config,
        provenance: dict[str, Any],
        quantization: QuantizationConfig | None = None,
    ) -> Path:
        """Finish the weights, record checksums in parrot_config.json, swap into place. A
        quantized checkpoint's `quantization` goes to quantization_config.json."""
        if quantization is not None:
            self.write_json(QUANT_CONFIG_FILE, quantization.to_dict())
        self._finish_weights()
        checksums = {
            p.name: sha256_file(p) for p in sorted(self.partial.iterdir()) if p.name != CONFIG_FILE
        }
        self.write_json(
            CONFIG_FILE,
            {
                "format_version": FORMAT_VERSION,
                "parrot_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": config.to_dict(),
                "provenance": {**provenance, "files": checksums},
            },
        )
        return self._swap()

    def commit_files(self) -> Path:
        """Finish the weights and swap into place without parrot's own config: for a
        directory in another format (a Hugging Face export) written with the same
        all-or-nothing rule."""
        self._finish_weights()
        return self._swap()

    def _finish_weights(self) -> None:
        """Write the last shard; name the shards (one: model.safetensors; several: the
        HF-style model-0000i-of-0000n files and their index)."""
        if self._shard is None and not self._shards:
            self._shard = _ShardFile(self.partial / "model-00001.safetensors", self.header_reserve)
        if self._shard is not None:
            self._close_shard()
        if len(self._shards) == 1:
            (self.partial / self._shards[0][0]).rename(self.partial / WEIGHTS_FILE)
        else:
            n = len(self._shards)
            weight_map = {}
            for i, (old, names) in enumerate(self._shards, 1):
                new = f"model-{i:05d}-of-{n:05d}.safetensors"
                (self.partial / old).rename(self.partial / new)
                weight_map.update(dict.fromkeys(names, new))
            self.write_json(
                INDEX_FILE, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )

    def _swap(self) -> Path:
        if self.target.exists() and _exchange(self.partial, self.target):
            # One atomic step: no moment when the target is missing or half there.
            shutil.rmtree(self.partial, ignore_errors=True)  # now the previous checkpoint
            return self.target
        old = None
        if self.target.exists():
            old = self.target.with_name(self.target.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            self.target.rename(old)
        self.partial.rename(self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where the
    system or filesystem cannot, and the caller renames in two steps instead."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_tensors(writer: CheckpointWriter, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[str]:
    """Add each tensor, yielding its name (callers drive a progress bar from it)."""
    for name, t in tensors:
        writer.add_tensor(name, t)
        yield name
