"""The Hugging Face GPTQ format (AutoGPTQ, gptqmodel, optimum, TheBloke's repos): reading it
into parrot's quantized layout with no float round trip, and writing it.

Per quantized Linear `P` (HF module names), weight [N outputs, K inputs], G groups:

  P.qweight  I32 [K/8, N]  4-bit codes packed along K: input 8r+j in bits 4j..4j+3 of row r
  P.qzeros   I32 [G, N/8]  integer zero points packed along N (output 8c+j in bits 4j..4j+3)
  P.scales   F16 [G, N]
  P.g_idx    I32 [K]       the group of each input (k // group_size unless act-order)
  P.bias     F16 [N]       when the Linear has one

w[n, k] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k]. "v1" files (format "gptq",
every published repo) store z - 1; "v2" (gptqmodel's "gptq_v2") stores z. v1 is decoded by
adding 0x11111111 to each 32-bit word, which undoes both a per-nibble and a gptqmodel
word-level subtraction (the latter borrows into the next nibble when z = 0).

Act-order files have a g_idx whose groups are scattered over the inputs. parrot stores the
inputs sorted by group instead (a stable argsort of g_idx: `QuantizedWeight.perm`), so each
group is contiguous again and the kernel gathers its input x[..., perm]; every group must
then hold exactly group_size inputs, as GPTQ makes them.

Writing (`parrot quantize gptq --format hf`) is the reverse, with v1 zero points: the
quantizer keeps asymmetric zero points in 1..15, so z - 1 is exact for every decoder (the
per-nibble +1 of AutoGPTQ, vLLM and exllama as well as gptqmodel's word-level one).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parrot_cli.checkpoint.hf import TensorSource
from parrot_cli.errors import CheckpointError
from parrot_cli.quantize.format import QuantizedWeight, pack_nibbles, unpack_nibbles

PACK = 8  # 4-bit values per 32-bit word
V1_OFFSET = 0x11111111  # +1 in every nibble of a word
SYM_WORD = 0x77777777  # a v1 word of eight symmetric zero points (z = 8, stored 7)
CONFIG_FILES = ("quantize_config.json", "quant_config.json")
UNSUPPORTED_FORMATS = {"marlin": "Marlin", "bitblas": "BitBLAS", "ipex": "IPEX", "qqq": "QQQ"}


@dataclass
class GPTQFileConfig:
    """What a GPTQ directory says about its quantization (normalised)."""

    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    desc_act: bool
    v1: bool  # zero points stored minus one
    lm_head: bool = False
    raw: dict[str, Any] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        """What quantization_config.json's details record of the source."""
        keep = ("damp_percent", "true_sequential", "static_groups", "meta", "dataset", "model_seqlen")
        return {
            "bits": self.bits, "group_size": self.group_size, "sym": self.sym, "desc_act": self.desc_act,
            "checkpoint_format": "gptq" if self.v1 else "gptq_v2",
            **{k: self.raw[k] for k in keep if k in self.raw},
        }


def read_gptq_config(source_dir: Path, hf_config: dict[str, Any]) -> GPTQFileConfig | None:
    """The GPTQ settings of a Hugging Face directory (config.json's quantization_config,
    else quantize_config.json or quant_config.json), None for a float checkpoint. Other
    quantization methods and GPTQ variants parrot cannot run are one clear error."""
    raw = hf_config.get("quantization_config")
    where = "config.json"
    if raw is None:
        for name in CONFIG_FILES:
            path = Path(source_dir) / name
            if path.is_file():
                try:
                    raw = json.loads(path.read_text())
                except ValueError as err:
                    raise CheckpointError(f"{path} is not valid JSON ({err}).") from err
                where = name
                break
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}'s quantization config is not an object.")
    cfg = {str(k).lower(): v for k, v in raw.items()}
    method = str(cfg.get("quant_method") or ("awq" if "w_bit" in cfg or "zero_point" in cfg else "gptq")).lower()
    if method != "gptq":
        raise CheckpointError(
            f"This checkpoint is quantized with {method!r} ({where}); parrot imports 4-bit GPTQ "
            "checkpoints and float ones: convert its float original instead."
        )
    fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    if cfg.get("is_marlin_format"):
        fmt = "marlin"
    if fmt in UNSUPPORTED_FORMATS:
        raise CheckpointError(
            f"This GPTQ checkpoint is in the {UNSUPPORTED_FORMATS[fmt]} kernel layout ({where}), which "
            "parrot does not read; use the repo's plain GPTQ files (format \"gptq\")."
        )
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"This GPTQ checkpoint has an unknown format {fmt!r} ({where}).")
    bits = cfg.get("bits", cfg.get("w_bit"))
    if bits != 4:
        raise CheckpointError(
            f"This GPTQ checkpoint has {bits}-bit weights ({where}); parrot runs 4-bit GPTQ only."
        )
    group = cfg.get("group_size", cfg.get("q_group_size", -1))
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise CheckpointError(f"This GPTQ checkpoint has an invalid group_size {group!r} ({where}).")
    if cfg.get("dynamic"):
        raise CheckpointError(
            f"This GPTQ checkpoint quantizes some modules differently (\"dynamic\" in {where}); "
            "parrot imports checkpoints with one setting for every module."
        )
    return GPTQFileConfig(
        bits=4, group_size=group, sym=bool(cfg.get("sym", True)), desc_act=bool(cfg.get("desc_act", False)),
        v1=fmt == "gptq", lm_head=bool(cfg.get("lm_head", False)), raw=cfg,
    )


# --------------------------------------------------------------------------- bit packing


def unpack_words(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> uint8 4-bit values, eight per word, unpacked along `dim` (0: rows,
    [R, C] -> [8R, C], qweight; 1: columns, [R, C] -> [R, 8C], qzeros). Value j of a word
    sits in bits 4j..4j+3."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=words.device)
    if dim == 0:
        values = (w[:, None, :] >> shifts[None, :, None]) & 0xF  # [R, 8, C]
        return values.reshape(-1, words.size(1)).to(torch.uint8)
    values = (w[:, :, None] >> shifts[None, None, :]) & 0xF  # [R, C, 8]
    return values.reshape(words.size(0), -1).to(torch.uint8)


def pack_words(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of `unpack_words`: 4-bit values (0..15) -> int32 words along `dim`."""
    v = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) > 15:
        raise ValueError("4-bit values must lie in 0..15 before packing")
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    if dim == 0:
        if v.size(0) % PACK:
            raise ValueError(f"{v.size(0)} rows do not pack into words of {PACK}")
        words = (v.reshape(-1, PACK, v.size(1)) << shifts[None, :, None]).sum(1)
    else:
        if v.size(1) % PACK:
            raise ValueError(f"{v.size(1)} columns do not pack into words of {PACK}")
        words = (v.reshape(v.size(0), -1, PACK) << shifts[None, None, :]).sum(2)
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def zeros_from_v1(qzeros: torch.Tensor) -> torch.Tensor:
    """v1 words (z - 1 per nibble) -> v2 words (z), by a word-level add of 0x11111111."""
    return _as_int32((qzeros.to(torch.int64) + V1_OFFSET) & 0xFFFFFFFF)


def zeros_to_v1(qzeros: torch.Tensor) -> torch.Tensor:
    """v2 words -> v1 words. Exact per nibble only when every zero point is >= 1."""
    return _as_int32((qzeros.to(torch.int64) - V1_OFFSET) & 0xFFFFFFFF)


# --------------------------------------------------------------------------- import


class GPTQTensorSource(TensorSource):
    """The tensors of an HF GPTQ directory where a Linear's `P.weight` is asked for as a
    `QuantizedWeight` decoded from P.qweight/qzeros/scales/g_idx (any other name reads
    through): the family mappers in `checkpoint/hf.py` then fuse and re-lay out rows as
    they do for float weights."""

    def __init__(self, inner: TensorSource, gptq: GPTQFileConfig) -> None:
        super().__init__({})
        self.inner = inner
        self.gptq = gptq

    def keys(self) -> set[str]:
        return self.inner.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.inner or (name.endswith(".weight") and name[:-7] + ".qweight" in self.inner)

    def get(self, name: str) -> torch.Tensor | QuantizedWeight:
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix + ".zeros" in self.inner and prefix + ".qzeros" not in self.inner:
            raise CheckpointError(
                f"{prefix} stores float zero points (an early GPTQ-for-LLaMa file); parrot reads "
                "GPTQ files with integer qzeros (AutoGPTQ, gptqmodel, optimum)."
            )
        if name.endswith(".weight") and prefix + ".qweight" in self.inner:
            parts = {k: self.inner.get(f"{prefix}.{k}") for k in _present(self.inner, prefix)}
            return decode_linear(prefix, parts, self.gptq)
        return self.inner.get(name)


def _present(src: TensorSource, prefix: str) -> list[str]:
    return [k for k in ("qweight", "qzeros", "scales", "g_idx") if f"{prefix}.{k}" in src]


def decode_linear(module: str, t: dict[str, torch.Tensor], gptq: GPTQFileConfig) -> QuantizedWeight:
    """One HF GPTQ Linear -> parrot's layout: codes [N, K] (inputs sorted by group when
    act-order), scales [N, G] as stored (fp16), integer zeros [N, G], perm. Every shape,
    type and value is checked: a bad file is one CheckpointError naming the tensor."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"The GPTQ weight {module} is inconsistent: {what}.")

    for key in ("qweight", "qzeros", "scales"):
        if key not in t:
            raise bad(f"{key} is missing")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise bad(f"qweight is {qweight.dtype} {list(qweight.shape)}, not an int32 matrix")
    k, n = qweight.size(0) * PACK, qweight.size(1)
    group = k if gptq.group_size == -1 else gptq.group_size
    if k % group:
        raise bad(f"group size {group} does not divide its {k} inputs")
    groups = k // group
    if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, n // PACK) or n % PACK:
        raise bad(f"qzeros are {qzeros.dtype} {list(qzeros.shape)}, not int32 [{groups}, {n // PACK}]")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or tuple(scales.shape) != (groups, n):
        raise bad(f"scales are {scales.dtype} {list(scales.shape)}, not [{groups}, {n}]")
    if not bool(torch.isfinite(scales).all()):
        raise bad("some scales are not finite")
    codes = unpack_words(qweight, 0).T  # [N, K]
    zeros = unpack_words(zeros_from_v1(qzeros) if gptq.v1 else qzeros, 1).T  # [N, G]
    perm = None
    g_idx = t.get("g_idx")
    plain = torch.arange(k, device=qweight.device) // group
    if g_idx is not None:
        if g_idx.dim() != 1 or g_idx.numel() != k or g_idx.is_floating_point():
            raise bad(f"g_idx is {g_idx.dtype} {list(g_idx.shape)}, not [{k}] integers")
        g_idx = g_idx.to(torch.int64)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise bad(f"g_idx names groups outside 0..{groups - 1}")
        if not torch.equal(g_idx, plain):
            counts = torch.bincount(g_idx, minlength=groups)
            if not bool((counts == group).all()):
                raise bad(f"its act-order groups hold {int(counts.min())} to {int(counts.max())} inputs, "
                          f"not {group} each")
            perm = torch.argsort(g_idx, stable=True)
            codes = codes[:, perm]
    qw = QuantizedWeight(4, pack_nibbles(codes.contiguous()), scales.T.contiguous(),
                         qzeros=zeros.contiguous(), perm=perm)
    qw.check_values(module)
    return qw


# --------------------------------------------------------------------------- export


def encode_linear(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """parrot's int4 weight with integer zeros -> HF GPTQ v1 tensors (qweight, qzeros,
    scales in fp16, g_idx). Zero points must be >= 1 (v1 stores them minus one)."""
    if qw.bits != 4 or qw.qzeros is None:
        raise ValueError(f"only int4 weights with integer zero points export to GPTQ, not {qw.describe()}")
    if int(qw.qzeros.min()) < 1:
        raise ValueError("a zero point of 0 cannot be stored exactly in a GPTQ v1 file")
    codes = unpack_nibbles(qw.data)  # [N, K], stored order
    k, group = qw.in_features, qw.group_size
    g_idx = torch.arange(k) // group
    if qw.perm is not None:
        ordered = torch.empty_like(codes)
        ordered[:, qw.perm] = codes  # input perm[j] is stored in column j
        codes = ordered
        g_idx = torch.empty_like(g_idx).index_copy_(0, qw.perm, g_idx)
    scales = qw.scales.to(torch.float16)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("a scale overflows float16")
    return {
        "qweight": pack_words(codes.T.contiguous(), 0),
        "qzeros": zeros_to_v1(pack_words((qw.qzeros.T).contiguous(), 1)),
        "scales": scales.T.contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


def quantization_config(settings, details: dict[str, Any]) -> dict[str, Any]:
    """The dict for config.json's quantization_config and quantize_config.json: every key
    AutoGPTQ, gptqmodel, optimum and vLLM's fast path read."""
    from parrot_cli import __version__

    calibration = details.get("calibration") or {}
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": settings.group_size,
        "desc_act": settings.act_order,
        "sym": settings.sym,
        "damp_percent": settings.damp,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "format": "gptq",
        "pack_dtype": "int32",
        "lm_head": False,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "meta": {"quantizer": [f"parrot:{__version__}"], "calibration": calibration,
                 "damp_percent": settings.damp},
    }


def write_hf_gptq(
    target: Path,
    source_dir: Path,
    config,
    entries: Iterator[tuple[str, Any]],
    settings,
    details: dict[str, Any],
) -> Path:
    """Stream parrot entries (floats and QuantizedWeights, parrot names) into a Hugging Face
    GPTQ directory at `target` (built in TARGET.partial/, renamed when complete)."""
    from parrot_cli.checkpoint.hf_export import hf_config, hf_tensors
    from parrot_cli.checkpoint.hub import TOKENIZER_FILES
    from parrot_cli.checkpoint.store import CheckpointWriter

    qconfig = quantization_config(settings, details)
    with CheckpointWriter(target) as writer:
        for name, value in entries:
            for hf_name, part in hf_tensors(config, name, value):
                if isinstance(part, QuantizedWeight):
                    prefix = hf_name.removesuffix(".weight")
                    for key, tensor in encode_linear(part).items():
                        writer.add_tensor(f"{prefix}.{key}", tensor)
                else:
                    writer.add_tensor(hf_name, part.to(torch.float16) if part.is_floating_point() else part)
        for file in TOKENIZER_FILES:
            if (source_dir / file).is_file():
                shutil.copyfile(source_dir / file, writer.partial / file)
        generation = source_dir / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, writer.partial / "generation_config.json")
        writer.write_json("config.json", {**hf_config(config), "quantization_config": qconfig})
        writer.write_json("quantize_config.json", qconfig)
        return writer.commit_files()
