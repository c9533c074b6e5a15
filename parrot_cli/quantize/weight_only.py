"""Weight-only int8 and int4 Linears on torch's own packed-weight kernels.

Decoding one token reads every weight once, so it is bound by memory bandwidth: int8 reads
half the bytes of bf16 and int4 a quarter. torch ships the matching batch-1 kernels
(`aten._weight_int8pack_mm`; `aten._weight_int4pack_mm_for_cpu` on CPU and the tinygemm
`aten._weight_int4pack_mm` on CUDA). They are fast only with bf16 activations (fp32 ones
take a path 15-30x slower, see FINDINGS.md), so these modules compute in bf16 whatever the
working precision is: inputs are cast to bf16 around the kernel and the output cast back.

- int8: symmetric, one scale per output channel (absmax / 127).
- int4: asymmetric, one scale and one zero point per group of `group_size` inputs (the
  tinygemm layout: w = (q - 8) * scale + zero, q in 0..15), scales and zeros in bf16.

Quantizers return a `format.QuantizedWeight` (the portable layout a checkpoint stores), and
the modules are built from one with `from_quantized`: load-time `--quantize`, a quantized
checkpoint, a GGUF import and GPTQ all reach the kernels through that one constructor.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.quantize.format import QuantizedWeight, pack_nibbles

COMPUTE = torch.bfloat16
# Above this many rows (a prefill) int8 weights are dequantized to bf16 for one dense
# matmul: the int8 kernel is a batch-1 kernel, 2x slower than dense bf16 at 300 rows.
DENSE_ROWS = 16
# int4: fractions of each group's min..max range tried as the quantization range.
RANGE_SHRINK = (1.0, 0.9, 0.8)


# Group sizes torch's int4 kernels take (CPU and CUDA).
KERNEL_GROUP_SIZES = (32, 64, 128, 256)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """int8 codes [N, K] and one bf16 scale per output channel, weight ~= q * scale. The
    integers are rounded against the bf16 scale the kernel will use, so rounding the scale
    adds no error."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(COMPUTE)
    q = torch.round(w / scales.float()[:, None]).clamp_(-128, 127).to(torch.int8)
    return QuantizedWeight(8, q, scales[:, None])


def quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """4-bit codes with a bf16 scale and zero per group of `group_size` inputs, in
    tinygemm's convention: w ~= (q - 8) * scale + zero.

    Plain min/max rounding wastes levels on outliers. Each group tries a few narrower
    ranges, refits scale and offset to its rounded values by least squares (as llama.cpp's
    k-quants do), and keeps the candidate with the smallest squared error. On SmolLM2 at
    group size 64 that cut the perplexity ratio over fp32 from 1.46x (min/max) to 1.36x,
    for ~2x the quantization time (a few seconds for 135M parameters)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best_q = best_scale = best_zero = best_err = None
    for shrink in RANGE_SHRINK:
        low = mid - half * shrink
        scale = (2 * half * shrink / 15).clamp(min=1e-8)
        q = _round4(w, low, scale)
        scale, low = _refit(w, q, scale, low)
        # What is stored: bf16 scale and zero; round against exactly those.
        scale = scale.clamp(min=1e-8).to(COMPUTE)
        zero = (low + 8 * scale.float()).to(COMPUTE)
        low = zero.float() - 8 * scale.float()
        q = _round4(w, low, scale.float())
        err = ((q * scale.float()[..., None] + low[..., None] - w) ** 2).sum(-1)
        if best_err is None:
            best_q, best_scale, best_zero, best_err = q, scale, zero, err
            continue
        better = err < best_err
        best_q = torch.where(better[..., None], q, best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    return QuantizedWeight(4, pack_nibbles(best_q.reshape(n, k)), best_scale, zeros=best_zero)


def _round4(w: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15)


def _refit(
    w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale and offset for w ~= q * scale + low per group (kept where a
    group's q are all equal)."""
    q_mean, w_mean = q.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
    var = ((q - q_mean) ** 2).sum(-1)
    cov = ((q - q_mean) * (w - w_mean)).sum(-1)
    fitted = torch.where(var > 0, cov / var.clamp(min=1e-12), scale)
    return fitted, w_mean[..., 0] - fitted * q_mean[..., 0]


class _WeightOnlyLinear(nn.Module):
    """Shared shape handling: [*, K] inputs in any float dtype -> [*, N] in that dtype.
    `perm` (act-order weights) gathers the inputs into the order the weight was stored in.

    Two backends. "native" (CPU, when parrot's kernels built: `kernels/native.py`) reads
    the portable layout as stored and computes in fp32: a matrix-vector kernel for a few
    rows (decode), and for more rows (a prefill) the weight dequantized tile by tile into
    fp32 for torch's dense matmul. "torch" runs torch's packed-weight kernels in bf16."""

    backend = "torch"

    def __init__(
        self, in_features: int, out_features: int, bias: torch.Tensor | None, perm: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("bias", bias)
        self.register_buffer("perm", perm)
        self._native_key: tuple = ()
        self._native_weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.backend == "native":
            y = self._native_matmul(rows)
        else:
            if self.perm is not None:
                rows = rows.index_select(1, self.perm)
            y = self._matmul(rows if rows.dtype == COMPUTE else rows.to(COMPUTE))
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _native_tensors(self) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def native_weight(self):
        """The kernels' descriptor of this weight (bias excluded: forward adds it), rebuilt
        when a buffer moved (`.to()`)."""
        from parrot_cli.kernels import native

        tensors = self._native_tensors()
        key = tuple(None if t is None else t.data_ptr() for t in tensors)
        if key != self._native_key:
            self._native_weight = self._describe(native, *tensors)
            self._native_key = key
        return self._native_weight

    def _native_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        from parrot_cli.kernels import native

        lib = native.library()
        if rows.size(0) <= NATIVE_ROWS:
            return native.linear_forward(lib, self.native_weight(), rows)  # gathers perm itself
        if self.perm is not None:
            rows = rows.index_select(1, self.perm)
        return native.dense_forward(lib, self.native_weight(), rows)

    def _tensor_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))


# Up to this many rows the native backend runs its matrix-vector kernel once per row;
# above it (a prefill) a dense fp32 matmul on dequantized tiles is faster.
NATIVE_ROWS = 4


def native_backend(device: torch.device) -> bool:
    """Whether weights on `device` run on parrot's native kernels (CPU, library built)."""
    if device.type != "cpu":
        return False
    from parrot_cli.kernels import native

    return native.library() is not None


class Int8Linear(_WeightOnlyLinear):
    """y = x @ (q * scale)^T + bias, with q int8 [N, K] and one bf16 scale per output."""

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, perm: torch.Tensor | None = None
    ) -> None:
        super().__init__(weight.size(1), weight.size(0), bias, perm)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        if native_backend(weight.device):
            self.backend = "native"
        self.use_kernel = int8_kernel_works(weight.device)
        self.nbytes = self._tensor_bytes()  # weight bytes, read by LLM.weight_bytes

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        return cls.from_quantized(quantize_int8(weight), bias)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device | None = None
    ) -> Int8Linear:
        """The kernel takes one scale per output channel: int8 weights stored with finer
        groups are re-quantized per channel here (their dequantized values, once)."""
        device = device or qw.data.device
        if qw.bits != 8:
            raise ValueError(f"{qw.describe()} weights need Int4Linear")
        if qw.groups != 1:
            qw = quantize_int8(qw.dequantize())
        perm = None if qw.perm is None else qw.perm.to(device)
        return cls(qw.data.to(device), qw.scales[:, 0].to(device, COMPUTE), bias, perm)

    def _native_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.weight, self.scales, self.perm

    @staticmethod
    def _describe(native, weight, scales, perm):
        return native.int8_weight(weight, scales, None, perm)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.size(0) <= DENSE_ROWS:
            return torch._weight_int8pack_mm(x, self.weight, self.scales)
        return F.linear(x, self.weight.to(COMPUTE) * self.scales[:, None])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {self.backend}"


class Int4Linear(_WeightOnlyLinear):
    """y = x @ dequant(q)^T + bias, q int4 with a scale and zero per group of `group_size`
    inputs. Native backend: the portable layout as stored (`qweight` uint8 [N, K/2],
    `scales`, float `zeros` or integer `qzeros` [N, G]; shared with a memory-mapped
    checkpoint, not copied). Torch backend: packed for torch's kernel on the weight's device
    (`packed`, bf16 `scales_and_zeros` [G, N, 2] in tinygemm's convention)."""

    def __init__(
        self,
        packed: torch.Tensor | None,
        scales_and_zeros: torch.Tensor | None,
        group_size: int,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None,
        perm: torch.Tensor | None = None,
        portable: QuantizedWeight | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, perm)
        self.group_size = group_size
        if portable is not None:
            self.backend = "native"
            self.register_buffer("qweight", portable.data)
            self.register_buffer("scales", portable.scales)
            self.register_buffer("zeros", portable.zeros)
            self.register_buffer("qzeros", portable.qzeros)
            self.on_cpu = True
        else:
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.on_cpu = packed.device.type == "cpu"
        self.nbytes = self._tensor_bytes()

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> Int4Linear:
        return cls.from_quantized(quantize_int4(weight, group_size), bias)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device | None = None
    ) -> Int4Linear:
        """Onto the native kernels as stored where they run (CPU; groups of 32, 64, a
        multiple of 128 or one per row), else packed for torch's kernel on `device`. Groups
        torch's kernel does not take (per-channel GPTQ, 512, 1024) are served exactly by
        repeating each scale and zero over the largest kernel group that divides them."""
        device = device or qw.data.device
        if qw.bits != 4:
            raise ValueError(f"{qw.describe()} weights need Int8Linear")
        perm = None if qw.perm is None else qw.perm.to(device)
        if native_backend(device):
            from parrot_cli.kernels.native import q4_group_ok

            if q4_group_ok(qw.group_size, qw.in_features):
                portable = QuantizedWeight(
                    4, qw.data.to(device), _kernel_floats(qw.scales, device),
                    None if qw.zeros is None else _kernel_floats(qw.zeros, device),
                    None if qw.qzeros is None else qw.qzeros.to(device),
                )
                return cls(None, None, qw.group_size, qw.in_features, qw.out_features, bias, perm,
                           portable=portable)
        kernel_group = kernel_group_size(qw.group_size, qw.in_features)
        repeat = qw.group_size // kernel_group
        scales = qw.scales.to(device).float()
        zeros = qw.tinygemm_zeros().to(device)
        sz = torch.stack((scales, zeros), dim=-1).to(COMPUTE)  # [N, G, 2]
        if repeat > 1:
            sz = sz.repeat_interleave(repeat, dim=1)
        # Unpacked on the target device, straight into the int32 codes the packers take.
        codes = replace(qw, data=qw.data.to(device)).codes(torch.int32)
        return cls(pack_int4(codes), sz.transpose(0, 1).contiguous(), kernel_group,
                   qw.in_features, qw.out_features, bias, perm)

    def _native_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.qweight, self.scales, self.zeros, self.qzeros, self.perm

    @staticmethod
    def _describe(native, qweight, scales, zeros, qzeros, perm):
        return native.int4_weight(qweight, scales, zeros, qzeros, None, perm)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_cpu:
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        return torch._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4, group_size={self.group_size}, {self.backend}"
        )


def _kernel_floats(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Scales and zeros as the native kernels read them: bf16 and fp32 as stored (no copy
    on CPU), fp16 (an imported GPTQ) widened to fp32 exactly."""
    t = t.to(device)
    return t if t.dtype in (torch.bfloat16, torch.float32) else t.float()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int32 [N, K] values 0..15 -> the packed layout of torch's int4 kernel on q's device."""
    if q.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q, 2)  # [N, K / 2] uint8
    # CUDA (tinygemm): two values per byte, high nibble first, then tiled by innerKTiles.
    k = q.size(1)
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    return torch._convert_weight_to_int4pack(tinygemm_pairs(q), inner_k_tiles)


def tinygemm_pairs(q: torch.Tensor) -> torch.Tensor:
    """int [N, K] codes 0..15 -> uint8 [N, K/2], the byte order CUDA's tinygemm packing
    reads: input 2j in the high nibble, 2j+1 in the low one (the portable layout's bytes
    with their nibbles swapped). Plain tensor ops, so a CPU test pins what a checkpoint
    written on CPU hands the CUDA kernel."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def kernel_group_size(group_size: int, in_features: int) -> int:
    """The group size torch's int4 kernel runs a weight of `group_size` with: itself when
    the kernel takes it, else the largest kernel group dividing it (the scales repeat)."""
    for g in sorted(KERNEL_GROUP_SIZES, reverse=True):
        if g <= group_size and group_size % g == 0 and in_features % g == 0:
            return g
    raise CheckpointError(
        f"int4 weights in groups of {group_size} cannot run on torch's int4 kernel (it takes "
        f"groups of {', '.join(map(str, KERNEL_GROUP_SIZES))}); re-quantize the float model."
    )


@functools.cache
def int8_kernel_works(device: torch.device) -> bool:
    """Whether this torch build has `_weight_int8pack_mm` for the device (CPU always has;
    elsewhere the int8 weights are dequantized per call instead)."""
    if device.type == "cpu":
        return True
    try:
        x = torch.zeros(1, 32, dtype=COMPUTE, device=device)
        w = torch.zeros(8, 32, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=COMPUTE, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def require_int4_cuda(device: torch.device) -> None:
    """torch's CUDA int4 kernel (tinygemm) needs bf16 tensor cores: Ampere or newer."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise UsageError(
            f"--quantize int4 on CUDA needs compute capability 8.0 or newer (this GPU has "
            f"{major}.{minor}); use --quantize bnb.nf4 or int8."
        )


class QuantizedEmbedding(nn.Module):
    """A token embedding kept in its portable quantized layout: a lookup dequantizes only
    the rows it reads, so a quantized checkpoint's table never exists in float. A tied
    head reads the same codes (see `tied_head`)."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        if qw.perm is not None:
            raise CheckpointError("An embedding table cannot be stored in act-order.")
        self.bits = qw.bits
        self.num_embeddings, self.embedding_dim = qw.out_features, qw.in_features
        self.dtype = dtype
        self.register_buffer("qweight", qw.data, persistent=False)
        self.register_buffer("scales", qw.scales, persistent=False)
        self.register_buffer("zeros", qw.zeros, persistent=False)
        self.register_buffer("qzeros", qw.qzeros, persistent=False)
        self.nbytes = qw.nbytes

    @property
    def qw(self) -> QuantizedWeight:
        """The table as a QuantizedWeight over this module's (possibly moved) buffers."""
        return QuantizedWeight(self.bits, self.qweight, self.scales, self.zeros, self.qzeros)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = self.qw.select_rows(flat).dequantize(self.dtype)
        return rows.view(*idx.shape, self.embedding_dim)

    def tied_head(self) -> nn.Module:
        """The output head of a tied model, on the embedding's own codes: per-channel int8
        tables and (on the native kernels) int4 ones share their tensors with the head (no
        second copy); others are packed for the kernel."""
        head = (Int4Linear if self.qw.bits == 4 else Int8Linear).from_quantized(self.qw, None)
        mine = {b.data_ptr() for b in self.buffers()}
        if all(b.data_ptr() in mine for name, b in head.named_buffers() if name not in ("bias", "perm")):
            head.nbytes = 0  # the embedding counts these bytes
        head.tied_embedding = True
        return head

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qw.describe()}"
