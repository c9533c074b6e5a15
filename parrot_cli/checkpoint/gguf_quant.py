"""GGUF tensors kept quantized: llama.cpp's block types -> the portable layout
(`quantize/format.py`), read straight from the file's memory map.

A GGUF import dequantized to float grows a Q4 model 7x (float32) and re-quantizing that
float at every start loses time and, for most types, accuracy. So each parrot weight is
stored in the closest portable mode, decided per weight from the types of its GGUF parts:

- Q4_0 (w = d * (q - 8)), Q4_1 (w = d * q + m) and Q4_K (super-blocks of 256 with 6-bit
  sub-block scales and mins, w = d * sc * q - dmin * mn) are 4-bit codes with one scale
  and one offset per 32 weights: int4 g32 holds them exactly, Q4_1 and Q4_K with a float
  zero (m + 8 d; 8 d sc - dmin mn), Q4_0 with the integer zero 8 (one byte a group).
  Their codes are copied; only the scales and zeros change, computed in fp32 from the
  fp16 block values and rounded once to bf16 (what the int4 kernel computes with).
- Types with no exact home are re-quantized from their dequantized values, per weight,
  to the smallest mode that does not lose much: more than 4 bits a weight (Q5_*, Q6_K,
  Q8_0...) -> int8 per output channel; at most 4 (Q2_K, Q3_K, IQ*) -> int4 g32.
- F16 / BF16 weights stay in that dtype, F32 ones (norms) stay float32.

A fused parrot module (attn.qkv = [q; k; v], mlp.fc = [gate; up]) has one mode: when its
parts disagree (Q4_K_M files keep attn_v and ffn_down in Q6_K in some layers) the whole
module goes to int8. llama.cpp's RoPE row permutation of q and k is undone on codes and
scales alike (it moves whole rows, which a row-wise layout follows exactly).

Everything works on chunks of rows, so a tensor's float copy never exists whole, and the
file pages of each tensor are handed back once it is converted: converting needs about
the output's size in memory, not the model's float size.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GQ

from parrot_cli.errors import CheckpointError
from parrot_cli.quantize.format import QuantizedWeight, pack_nibbles
from parrot_cli.quantize.weight_only import COMPUTE, quantize_int4, quantize_int8

if TYPE_CHECKING:
    from parrot_cli.quantize.qconfig import QuantizationConfig

# Block types whose values int4 g32 (float zero) holds exactly (up to bf16 scales).
EXACT_INT4 = (GQ.Q4_0, GQ.Q4_1, GQ.Q4_K)
FLOAT_TYPES = {GQ.F32: torch.float32, GQ.F16: torch.float16, GQ.BF16: torch.bfloat16}
GROUP = 32  # int4 group size of every GGUF import: llama.cpp's block (or sub-block) size
# Kernel limits for int4 (torch's CPU packing needs 16 | N; both kernels need 32 | K).
INT4_ROW_MULTIPLE = 16
CHUNK_ELEMENTS = 1 << 21  # rows per conversion step: ~8 MB of float32 transients

# How a module's values relate to the file's (recorded as "how" in quantization_config).
EXACT, REQUANTIZED, PROMOTED, SHAPE = "exact", "requantized", "promoted", "shape"


# --------------------------------------------------------------------------- what a weight is


@dataclass(frozen=True)
class GGUFPart:
    """One GGUF tensor as stored: raw bytes on the memory map, not yet decoded."""

    name: str
    qtype: GQ
    raw: np.ndarray  # the reader's view: uint8 [rows, bytes per row] or float [rows, cols]
    shape: tuple[int, ...]  # logical (HF) shape: (rows, cols) or (n,)
    unpermute_heads: int = 0  # q/k: heads whose RoPE row permutation to undo

    @property
    def type_name(self) -> str:
        return self.qtype.name


@dataclass(frozen=True)
class GGUFWeight:
    """One parrot tensor still in GGUF blocks: one GGUF tensor, or several stacked by rows
    (the converter's mappers fuse [q; k; v] and [gate; up] with `cat_rows`, as they
    concatenate float tensors)."""

    parts: tuple[GGUFPart, ...]

    @staticmethod
    def cat_rows(weights: list[GGUFWeight] | tuple[GGUFWeight, ...]) -> GGUFWeight:
        return GGUFWeight(tuple(p for w in weights for p in w.parts))

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.parts[0].shape
        if len(first) == 1:
            return (sum(p.shape[0] for p in self.parts),)
        return (sum(p.shape[0] for p in self.parts), first[1])

    @property
    def source(self) -> str:
        """The GGUF types it comes from, e.g. 'Q4_K' or 'Q4_K+Q6_K'."""
        return "+".join(dict.fromkeys(p.type_name for p in self.parts))


def target_of(qtype: GQ) -> str:
    """'float', 'int4' or 'int8': where one GGUF type's values go on their own."""
    if qtype in FLOAT_TYPES:
        return "float"
    if qtype in EXACT_INT4:
        return "int4"
    sizes = gguf.GGML_QUANT_SIZES.get(qtype)
    if sizes is None:
        raise CheckpointError(f"Tensors of type {qtype.name} cannot be imported.")
    block, type_size = sizes
    return "int4" if type_size * 8 / block < 5 else "int8"  # <= 4-bit codes: int4


def plan_mode(weight: GGUFWeight) -> str:
    """The one mode of a parrot weight: float when every part is float, int4 when every
    part maps to int4 and the shape fits the int4 kernel, else int8 (which holds any
    shape and loses little whatever the source)."""
    if len(weight.shape) == 1:
        return "float"
    targets = {target_of(p.qtype) for p in weight.parts}
    if targets == {"float"}:
        return "float"
    rows, cols = weight.shape
    if targets == {"int4"} and rows % INT4_ROW_MULTIPLE == 0 and cols % GROUP == 0:
        return "int4"
    return "int8"


# --------------------------------------------------------------------------- rounding record


@dataclass
class ScaleRounding:
    """The fp32 -> bf16 rounding of exact int4 scales and zeros (the only change an exact
    import makes): relative error, max and mean over every non-zero value."""

    count: int = 0
    scale_max: float = 0.0
    scale_sum: float = 0.0
    zero_max: float = 0.0
    zero_sum: float = 0.0
    zero_count: int = 0

    def add(self, exact_scales: torch.Tensor, exact_zeros: torch.Tensor) -> None:
        for exact, attr in ((exact_scales, "scale"), (exact_zeros, "zero")):
            nonzero = exact[exact != 0]
            if not nonzero.numel():
                continue
            rel = ((nonzero.to(COMPUTE).float() - nonzero) / nonzero).abs()
            setattr(self, f"{attr}_max", max(getattr(self, f"{attr}_max"), float(rel.max())))
            setattr(self, f"{attr}_sum", getattr(self, f"{attr}_sum") + float(rel.sum(dtype=torch.float64)))
            if attr == "scale":
                self.count += nonzero.numel()
            else:
                self.zero_count += nonzero.numel()

    def to_dict(self) -> dict[str, float]:
        return {
            "scale_rel_max": self.scale_max,
            "scale_rel_mean": self.scale_sum / max(self.count, 1),
            "zero_rel_max": self.zero_max,
            "zero_rel_mean": self.zero_sum / max(self.zero_count, 1),
        }


# --------------------------------------------------------------------------- converting


@dataclass
class Stored:
    """What one GGUF weight becomes: a float tensor, or a QuantizedWeight with its
    `quantization_config.json` entry."""

    tensor: torch.Tensor | None = None
    quantized: QuantizedWeight | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def store(weight: GGUFWeight, rounding: ScaleRounding | None = None) -> Stored:
    """Convert one parrot weight from its GGUF parts to what the checkpoint stores."""
    mode = plan_mode(weight)
    try:
        if mode == "float":
            return Stored(tensor=_float(weight))
        parts = [_quantized_part(p, mode, rounding) for p in weight.parts]
    finally:
        for part in weight.parts:
            release_pages(part.raw)
    if len({p.zero_kind for p in parts}) > 1:  # e.g. Q4_0 beside Q4_1: one zero kind
        parts = [_float_zeros(p) for p in parts]
    qw = parts[0] if len(parts) == 1 else QuantizedWeight.cat_rows(parts)
    alone = {target_of(p.qtype) for p in weight.parts}
    if mode == "int4":
        how = EXACT if all(p.qtype in EXACT_INT4 for p in weight.parts) else REQUANTIZED
    elif alone == {"int8"}:
        how = REQUANTIZED
    else:
        how = PROMOTED if len(alone) > 1 else SHAPE
    return Stored(quantized=qw, meta={**qw.meta(), "from": weight.source, "how": how})


def _float_zeros(qw: QuantizedWeight) -> QuantizedWeight:
    """The same int4 weight with float zeros (scale * (8 - z): exact for Q4_0's z = 8)."""
    if qw.zero_kind != "int":
        return qw
    return QuantizedWeight(4, qw.data, qw.scales, zeros=qw.tinygemm_zeros().to(qw.scales.dtype))


def _float(weight: GGUFWeight) -> torch.Tensor:
    """Float parts keep their dtype (F16 stays 16-bit); parts of different float types,
    or quantized 1-D tensors, become float32."""
    dtypes = {FLOAT_TYPES.get(p.qtype) for p in weight.parts}
    dtype = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    tensors = [_unpermute(_float_part(p, dtype), p.unpermute_heads) for p in weight.parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _float_part(part: GGUFPart, dtype: torch.dtype) -> torch.Tensor:
    raw = part.raw
    if part.qtype == GQ.BF16:
        out = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(torch.bfloat16)
    elif part.qtype in FLOAT_TYPES:
        out = torch.from_numpy(np.array(raw))
    else:
        out = torch.cat([torch.from_numpy(_dequantize(part, rows)) for rows in _chunks(part)])
    return out.reshape(part.shape).to(dtype)


def _quantized_part(part: GGUFPart, mode: str, rounding: ScaleRounding | None) -> QuantizedWeight:
    """One GGUF tensor in `mode` (int4 g32 or int8 per channel), rows in HF order."""
    chunks = []
    for rows in _chunks(part):
        if mode == "int4" and part.qtype in EXACT_INT4:
            chunks.append(exact_int4(part.raw[rows], part.qtype, part.shape[1], rounding))
            continue
        values = torch.from_numpy(_dequantize(part, rows))
        chunks.append(quantize_int4(values, GROUP) if mode == "int4" else quantize_int8(values))
    qw = chunks[0] if len(chunks) == 1 else QuantizedWeight.cat_rows(chunks)
    if part.unpermute_heads:
        qw = qw.select_rows(_unpermute(torch.arange(part.shape[0]), part.unpermute_heads))
    return qw


def _chunks(part: GGUFPart) -> Iterator[slice]:
    rows = part.shape[0] if len(part.shape) > 1 else 1
    cols = part.shape[-1] if len(part.shape) > 1 else part.shape[0]
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _dequantize(part: GGUFPart, rows: slice) -> np.ndarray:
    """float32 [rows, cols] of a quantized part, through gguf's own dequantization."""
    raw = part.raw if part.raw.ndim > 1 else part.raw[None]
    try:
        values = gguf.quants.dequantize(np.array(raw[rows]), part.qtype)
    except NotImplementedError as err:
        raise CheckpointError(
            f"Tensor {part.name} is stored as {part.type_name}, which parrot cannot dequantize."
        ) from err
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1, part.shape[-1])


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    if not heads:
        return t
    from parrot_cli.checkpoint.gguf import _unpermute_rope_rows

    return _unpermute_rope_rows(t, heads)


# --------------------------------------------------------------------------- exact int4


def exact_int4(
    raw: np.ndarray, qtype: GQ, cols: int, rounding: ScaleRounding | None = None,
    scale_dtype: torch.dtype = COMPUTE,
) -> QuantizedWeight:
    """Q4_0 / Q4_1 / Q4_K blocks uint8 [rows, bytes per row] -> int4 g32 with float zeros:
    w = (q - 8) * scale + zero, the file's own 4-bit codes, scales and zeros computed in
    fp32 and rounded once to `scale_dtype` (float32 keeps them exact, for tests)."""
    rows = raw.shape[0]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(rows, cols // block_size, type_size)
    if qtype == GQ.Q4_K:
        codes, scales, zeros = _q4_k(blocks)
    else:
        d = _f16(blocks, 0)
        qs = blocks[..., 4:20] if qtype == GQ.Q4_1 else blocks[..., 2:18]
        # Block of 32: byte j holds element j (low nibble) and element j + 16 (high).
        codes = torch.cat((qs & 0x0F, qs >> 4), dim=-1)
        scales = d
        # Q4_0: w = d * (q - 8), zero 0.  Q4_1: w = d * q + m = d * (q - 8) + (m + 8 d).
        zeros = torch.zeros_like(d) if qtype == GQ.Q4_0 else _f16(blocks, 2) + 8 * d
    scales, zeros = scales.reshape(rows, -1), zeros.reshape(rows, -1)
    if rounding is not None:
        rounding.add(scales, zeros)
    data = pack_nibbles(codes.reshape(rows, cols))
    if qtype == GQ.Q4_0:
        # w = d * (q - 8) is the integer-zero form with z = 8: one byte a group, not two.
        return QuantizedWeight(4, data, scales.to(scale_dtype), qzeros=torch.full_like(data[:, : scales.size(1)], 8))
    return QuantizedWeight(4, data, scales.to(scale_dtype), zeros=zeros.to(scale_dtype))


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block, as float32 [rows, blocks]."""
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16)[..., 0].float()


def _q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks [rows, n, 144]: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block
    scales and mins, 128 bytes of codes. Returns codes [rows, n, 8, 32] and fp32 scale and
    zero [rows, n, 8] per sub-block of 32 (w = d*sc*q - dmin*mn = (q - 8)*scale + zero)."""
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    packed = blocks[..., 4:16].to(torch.int32)  # [rows, n, 12]
    low, high = packed[..., 0:4], packed[..., 4:8]
    extra = packed[..., 8:12]
    # Sub-blocks 0-3: 6 bits in bytes 0-3 (scale) and 4-7 (min). Sub-blocks 4-7: 4 low
    # bits in bytes 8-11 (scale: low nibble, min: high nibble) and the top 2 bits taken
    # from bits 6-7 of bytes 0-3 (scale) and 4-7 (min).
    sc = torch.cat((low & 63, (extra & 0x0F) | ((low >> 6) << 4)), dim=-1)
    mn = torch.cat((high & 63, (extra >> 4) | ((high >> 6) << 4)), dim=-1)
    # Codes: four runs of 32 bytes; run r holds sub-block 2r in low nibbles, 2r+1 in high.
    qs = blocks[..., 16:144].reshape(*blocks.shape[:2], 4, 32)
    codes = torch.stack((qs & 0x0F, qs >> 4), dim=-2).reshape(*blocks.shape[:2], 8, 32)
    scale = d * sc.float()
    zero = 8 * scale - dmin * mn.float()
    return codes, scale, zero


# --------------------------------------------------------------------------- memory


def release_pages(array: np.ndarray) -> None:
    """Drop this process's resident pages of a read-only file mapping (the GGUF reader's
    memory map) once its tensor is converted: the kernel re-reads them from the file if
    they are touched again, and converting a model does not end holding all of it.
    Only whole pages strictly inside the array; a no-op off Linux or for arrays that are
    not views of a read-only mmap (anonymous memory would be zeroed, so never there)."""
    if not sys.platform.startswith("linux") or not array.nbytes:
        return
    base = array
    while isinstance(getattr(base, "base", None), np.ndarray):
        base = base.base
    if not isinstance(getattr(base, "base", None), mmap.mmap) or base.flags.writeable:
        return
    page = mmap.PAGESIZE
    begin = array.ctypes.data
    first, last = -(-begin // page) * page, (begin + array.nbytes) // page * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


# --------------------------------------------------------------------------- one import


BLOCKS = "transformer.h."


class GGUFImport:
    """Turns a converter's stream of (parrot name, GGUFWeight) into what the checkpoint
    stores, recording each quantized module for `quantization_config.json`."""

    def __init__(self, file_type: str | None = None) -> None:
        self.file_type = file_type
        self.rounding = ScaleRounding()
        self.modules: dict[str, dict[str, Any]] = {}
        self.block_modes: dict[str, str] = {}  # every 2-D block weight -> its mode
        self.kept: dict[str, int] = {}  # float 2-D weights by source type

    def convert(self, items: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        for name, weight in items:
            if not isinstance(weight, GGUFWeight):
                yield name, weight
                continue
            stored = store(weight, self.rounding)
            module = name.removesuffix(".weight")
            if len(weight.shape) == 2 and name.startswith(BLOCKS):
                self.block_modes[module] = f"int{stored.quantized.bits}" if stored.quantized else "float"
            if stored.quantized is not None:
                self.modules[module] = stored.meta
                yield name, stored.quantized
            else:
                if len(weight.shape) == 2:
                    self.kept[weight.source] = self.kept.get(weight.source, 0) + 1
                yield name, stored.tensor

    def config(self) -> QuantizationConfig | None:
        """The checkpoint's quantization config (None when nothing stayed quantized):
        its mode is the block Linears' one mode, or 'mixed'."""
        from parrot_cli.quantize.qconfig import QuantizationConfig

        if not self.modules:
            return None
        modes = set(self.block_modes.values())
        mode = modes.pop() if len(modes) == 1 and "float" not in modes else "mixed"
        details: dict[str, Any] = {"gguf_file_type": self.file_type}
        if self.rounding.count:
            details["scale_rounding"] = self.rounding.to_dict()
        if self.kept:
            details["kept_float"] = self.kept
        return QuantizationConfig(mode, "gguf", self.modules, details)
