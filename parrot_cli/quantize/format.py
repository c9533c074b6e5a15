"""The one quantized-weight layout: on disk in a checkpoint, and in memory until a kernel
packs it.

GGUF imports, `parrot quantize int4|int8`, load-time `--quantize int4|int8` and GPTQ
(ours or imported from a Hugging Face GPTQ repo) all produce a `QuantizedWeight`; the
loader turns every one of them into the device's kernel layout in one place
(`weight_only.Int4Linear/Int8Linear.from_quantized`). The layout is plain and device
independent: any machine can read it, and nothing in it is packed for one kernel.

Tensors of one quantized module P (parrot names: `transformer.h.3.attn.qkv`, `lm_head`,
`transformer.wte`), weight [N outputs, K inputs]:

  int4   P.qweight  U8   [N, K/2]   two 4-bit codes q in 0..15 per byte along K:
                                    input 2j in the low nibble, 2j+1 in the high one
         P.scales   BF16 [N, G]     one scale per group of g = K/G consecutive inputs
         P.zeros    BF16 [N, G]     float zero:    w = (q - 8) * scale + zero   (RTN, GGUF)
      or P.qzeros   U8   [N, G]     integer zero z: w = scale * (q - z)         (GPTQ)
  int8   P.qweight  I8   [N, K]     symmetric:     w = q * scale
         P.scales   BF16 [N, G]     (G = 1: one scale per output channel)
  either P.perm     I64  [K]        optional (GPTQ act-order): stored column j holds input
                                    perm[j], so y = x[..., perm] @ W_stored^T
         P.bias     float [N]       as in a float checkpoint

Scales and zeros may also be F16 or F32 on disk (an imported GPTQ keeps its fp16
scales); kernels get them in bf16. `quantization_config.json` beside the weights says
which modules are quantized and how (`QuantizationConfig`); every module it does not name
holds a plain float `P.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from parrot_cli.errors import CheckpointError
from parrot_cli.quantize.qconfig import (  # noqa: F401 (the format's names, re-exported)
    QUANT_CONFIG_FILE,
    ZERO_KINDS,
    QuantizationConfig,
    read_quantization_config,
)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# --------------------------------------------------------------------------- nibbles


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes in 0..15 -> uint8 [N, K/2] (input 2j low nibble, 2j+1 high)."""
    if codes.size(-1) % 2:
        raise ValueError(f"int4 needs an even number of inputs, not {codes.size(-1)}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """uint8 [N, K/2] -> [N, K] codes in 0..15 (the inverse of `pack_nibbles`), written
    straight into `dtype` (the CPU int4 packer wants int32): one pass, no intermediate."""
    out = torch.empty(*packed.shape[:-1], packed.size(-1) * 2, dtype=dtype, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    torch.bitwise_right_shift(packed, 4, out=out[..., 1::2])
    return out


# --------------------------------------------------------------------------- one module


@dataclass
class QuantizedWeight:
    """One quantized weight matrix [N, K] in the portable layout (see the module doc).

    `data` is the packed uint8 [N, K/2] (int4) or int8 [N, K] (int8) tensor exactly as
    stored, so a weight read from a memory-mapped checkpoint is not copied until a kernel
    packs it."""

    bits: int
    data: torch.Tensor
    scales: torch.Tensor  # [N, G]
    zeros: torch.Tensor | None = None  # int4, float zero [N, G]
    qzeros: torch.Tensor | None = None  # int4, integer zero uint8 [N, G]
    perm: torch.Tensor | None = None  # int64 [K]

    # ------------------------------------------------------------ shape

    @property
    def out_features(self) -> int:
        return self.data.size(0)

    @property
    def in_features(self) -> int:
        return self.data.size(1) * (2 if self.bits == 4 else 1)

    @property
    def groups(self) -> int:
        return self.scales.size(1)

    @property
    def group_size(self) -> int:
        return self.in_features // self.groups

    @property
    def zero_kind(self) -> str | None:
        if self.bits != 4:
            return None
        return "int" if self.qzeros is not None else "float"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def describe(self) -> str:
        """e.g. 'int4 g32', 'int4 g128 act-order', 'int8'."""
        group = f" g{self.group_size}" if self.groups > 1 or self.bits == 4 else ""
        return f"int{self.bits}{group}" + (" act-order" if self.perm is not None else "")

    def meta(self) -> dict[str, Any]:
        """What `quantization_config.json` records for this module."""
        info: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size}
        if self.bits == 4:
            info["zero"] = self.zero_kind
        if self.perm is not None:
            info["act_order"] = True
        return info

    # ------------------------------------------------------------ values

    def codes(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Integer codes [N, K] in stored column order: uint8 0..15 (int4) or int8, or in
        `dtype` when given."""
        if self.bits == 4:
            return unpack_nibbles(self.data, dtype or torch.uint8)
        return self.data if dtype is None else self.data.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this stands for, columns in input order (for checks,
        for dense fallbacks and for re-quantizing into another mode)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        q = self.codes().float().reshape(n, self.groups, g)
        scale = self.scales.float()[..., None]
        if self.bits == 8:
            w = q * scale
        elif self.qzeros is not None:
            w = (q - self.qzeros.float()[..., None]) * scale
        else:
            w = (q - 8) * scale + self.zeros.float()[..., None]
        w = w.reshape(n, k)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def tinygemm_zeros(self) -> torch.Tensor:
        """float32 [N, G] zero term of w = (q - 8) * scale + zero, whatever the zero kind
        (integer z: zero = scale * (8 - z), computed in fp32 and rounded once by the caller)."""
        if self.bits != 4:
            raise ValueError("only int4 weights have zero points")
        if self.qzeros is not None:
            return self.scales.float() * (8 - self.qzeros.float())
        return self.zeros.float()

    # ------------------------------------------------------------ slicing (TP, fusion)

    def select_rows(self, index: torch.Tensor | slice) -> QuantizedWeight:
        """The output rows `index` (a fused qkv split per head, a tensor-parallel shard)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return replace(self, data=pick(self.data), scales=pick(self.scales), zeros=pick(self.zeros),
                       qzeros=pick(self.qzeros))

    def select_columns(self, start: int, end: int) -> QuantizedWeight:
        """Inputs [start, end) (a row-parallel shard); the cut must fall on group
        boundaries, and act-order weights (inputs stored out of order) cannot be cut. With
        one group per row (per-channel scales) any cut keeps the row's scale and zero."""
        g = self.group_size
        if self.perm is not None:
            raise ValueError("act-order weights cannot be split along their inputs")
        if self.groups == 1:
            if self.bits == 4 and (start % 2 or end % 2):
                raise ValueError(f"int4 inputs {start}:{end} split a byte of two codes")
            data = self.data[:, start // 2 : end // 2] if self.bits == 4 else self.data[:, start:end]
            return replace(self, data=data)
        if start % g or end % g:
            raise ValueError(f"inputs {start}:{end} do not fall on groups of {g}")
        if self.bits == 4:
            data = self.data[:, start // 2 : end // 2]
        else:
            data = self.data[:, start:end]

        def cols(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, start // g : end // g]

        return replace(self, data=data, scales=cols(self.scales), zeros=cols(self.zeros),
                       qzeros=cols(self.qzeros))

    @staticmethod
    def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack weights that read the same input ([q; k; v], [gate; up]) into one; they
        must agree on bits, group size, zero kind and input order."""
        first = parts[0]
        for p in parts[1:]:
            same_perm = (p.perm is None and first.perm is None) or (
                p.perm is not None and first.perm is not None and torch.equal(p.perm, first.perm)
            )
            if (p.bits, p.group_size, p.zero_kind, p.in_features) != (
                first.bits, first.group_size, first.zero_kind, first.in_features
            ) or not same_perm:
                raise ValueError(f"cannot fuse {first.describe()} with {p.describe()}")

        def cat(name: str) -> torch.Tensor | None:
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        return replace(first, data=cat("data"), scales=cat("scales"), zeros=cat("zeros"),
                       qzeros=cat("qzeros"))

    # ------------------------------------------------------------ disk

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors to store under `prefix` (e.g. 'transformer.h.0.attn.qkv.')."""
        out = {prefix + "qweight": self.data, prefix + "scales": self.scales}
        if self.zeros is not None:
            out[prefix + "zeros"] = self.zeros
        if self.qzeros is not None:
            out[prefix + "qzeros"] = self.qzeros
        if self.perm is not None:
            out[prefix + "perm"] = self.perm
        return out

    @classmethod
    def from_tensors(cls, module: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> QuantizedWeight:
        """Read module `module` from a checkpoint's tensors, checking every shape and type
        against `meta` (its `quantization_config.json` entry): a truncated or inconsistent
        checkpoint is one CheckpointError naming the tensor, never a crash in a kernel."""
        p = module + "."

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"The quantized weight {module} is inconsistent: {what}.")

        bits = meta.get("bits")
        if type(bits) is not int or bits not in (4, 8):
            raise bad(f"it has {bits!r} bits (parrot stores 4 or 8)")
        try:
            data, scales = tensors[p + "qweight"], tensors[p + "scales"]
        except KeyError as err:
            raise bad(f"{err.args[0]} is missing") from None
        want = torch.uint8 if bits == 4 else torch.int8
        if data.dtype != want or data.dim() != 2:
            raise bad(f"qweight is {data.dtype} with {data.dim()} dims, not a {want} matrix")
        if scales.dtype not in FLOAT_DTYPES or scales.dim() != 2 or scales.size(0) != data.size(0):
            raise bad(f"scales are {scales.dtype} {list(scales.shape)} for {data.size(0)} outputs")
        qw = cls(bits, data, scales, tensors.get(p + "zeros"), tensors.get(p + "qzeros"), tensors.get(p + "perm"))
        k, groups = qw.in_features, scales.size(1)
        if groups == 0 or k % groups:
            raise bad(f"{groups} scale groups do not divide {k} inputs")
        if meta.get("group_size") not in (None, k // groups):
            raise bad(f"its config says group size {meta.get('group_size')} but the scales give {k // groups}")
        if bits == 4:
            kind = meta.get("zero", "float")
            if kind not in ZERO_KINDS:
                raise bad(f"zero kind {kind!r} is unknown")
            zeros = qw.qzeros if kind == "int" else qw.zeros
            other = qw.zeros if kind == "int" else qw.qzeros
            if zeros is None:
                raise bad(f"{'qzeros' if kind == 'int' else 'zeros'} is missing")
            if other is not None:
                raise bad("it has both zeros and qzeros")
            if tuple(zeros.shape) != tuple(scales.shape):
                raise bad(f"zero points {list(zeros.shape)} do not match scales {list(scales.shape)}")
            if kind == "int" and zeros.dtype != torch.uint8:
                raise bad("qzeros are not uint8")
            if kind == "float" and zeros.dtype not in FLOAT_DTYPES:
                raise bad("zeros are not floating point")
        elif qw.zeros is not None or qw.qzeros is not None:
            raise bad("int8 weights are symmetric and have no zero points")
        if qw.perm is not None:
            if qw.perm.dtype != torch.int64 or tuple(qw.perm.shape) != (k,):
                raise bad(f"perm is {qw.perm.dtype} {list(qw.perm.shape)}, not int64 [{k}]")
        if bool(meta.get("act_order")) != (qw.perm is not None):
            raise bad("its config and its tensors disagree on act-order")
        if qw.perm is not None and not torch.equal(torch.sort(qw.perm).values, torch.arange(k)):
            # Checked on every load (K entries, cheap): an index out of range would fail
            # mid-generation, inside the forward.
            raise bad("perm is not a permutation of its inputs")
        return qw

    def check_values(self, module: str) -> None:
        """Value checks too costly for every load but cheap once (after import, in tests):
        integer zeros within 0..15, perm a permutation."""
        if self.qzeros is not None and int(self.qzeros.max()) > 15:
            raise CheckpointError(f"The quantized weight {module} has zero points above 15.")
        if self.perm is not None:
            k = self.in_features
            if not torch.equal(torch.sort(self.perm).values, torch.arange(k)):
                raise CheckpointError(f"The quantized weight {module} has a perm that is not a permutation.")
