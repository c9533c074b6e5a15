"""parrot's native CPU kernels (`parrot_kernels.c`): built once, loaded with ctypes.

The library is compiled at first use with the system's C compiler (`$CC`, else `cc`) into
the cache (`<cache>/kernels/`, named after a hash of the source, compiler and flags, so an
upgrade rebuilds and concurrent first uses cannot see a half-written file), which takes a
few seconds once per machine. A plain C library keeps that cost low: a torch C++
extension would take about a minute to build and would tie the cache to one torch build.
OpenMP inside the library resolves to the libgomp torch already loaded, so the kernels and
torch's own ops share one pool of threads.

Anything that stops the build or the load (no compiler, a failed compile,
`PARROT_KERNELS=torch`) leaves `library()` None: every caller then uses torch's kernels,
and `unavailable_reason()` says why. `PARROT_KERNELS=generic|avx2|avx512` picks an
instruction set (default: the widest this CPU runs). After loading, each instruction set the CPU
runs is checked against the portable C code on a small problem (`_self_check`); one that
disagrees is not used.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("parrot_kernels.c")
VERSION = 1  # PK_VERSION in the source
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno", "-fvisibility=hidden"]
BUILD_TIMEOUT_S = 300
ISA_NAMES = ("generic", "avx2", "avx512")

# Weight kinds and dtypes (the enums of the source).
F32, BF16, Q8, Q4 = 0, 1, 2, 3
DT_F32, DT_BF16, DT_U8 = 0, 1, 2
_DTYPES = {torch.float32: DT_F32, torch.bfloat16: DT_BF16, torch.uint8: DT_U8}


class PkLinear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
        ("group", ctypes.c_int32), ("scale_dtype", ctypes.c_int32), ("zero_dtype", ctypes.c_int32),
        ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
        ("bias", ctypes.c_void_p), ("perm", ctypes.c_void_p),
    ]


class PkLayer(ctypes.Structure):
    _fields_ = [
        ("qkv", PkLinear), ("proj", PkLinear), ("fc", PkLinear), ("mproj", PkLinear),
        ("n1w", ctypes.c_void_p), ("n1b", ctypes.c_void_p), ("n2w", ctypes.c_void_p),
        ("n2b", ctypes.c_void_p), ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p),
    ]


class PkModel(ctypes.Structure):
    _fields_ = [
        *[(name, ctypes.c_int32) for name in (
            "n_layer", "n_embd", "n_head", "n_kv", "head_size", "rope_n_elem", "inter", "vocab",
            "norm_kind", "mlp_kind", "act", "parallel_residual",
            "cache_len", "window", "max_threads", "n_cand")],
        ("norm_eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
        ("layers", ctypes.c_void_p),
        ("emb", PkLinear), ("lnf_w", ctypes.c_void_p), ("lnf_b", ctypes.c_void_p),
        ("head", PkLinear), ("fast_head", PkLinear), ("fast_head_err", ctypes.c_void_p),
        *[(name, ctypes.c_void_p) for name in (
            "x", "qkv", "att", "hid", "logits", "part", "xf",
            "cand_val", "cand_exact", "out_val", "cand_id", "out_id")],
    ]


@dataclass
class Native:
    """The loaded library and what it runs here."""

    lib: ctypes.CDLL
    path: Path
    isa: str
    openmp: bool
    supported: list[str] = field(default_factory=list)

    def select(self, isa: str) -> str:
        """Run the kernels on another instruction set this CPU has (tests compare them)."""
        chosen = self.lib.pk_select_isa(ISA_NAMES.index(isa))
        if chosen < 0:
            raise ValueError(f"this CPU cannot run the {isa} kernels")
        self.isa = isa
        return isa


_unavailable: list[str] = []
_turned_off = 0


def unavailable_reason() -> str | None:
    """Why `library()` is None (after it was called), or None when it loaded."""
    if _turned_off:
        return "turned off"
    return _unavailable[0] if _unavailable else None


def library() -> Native | None:
    """The native kernels, built on first use; None (see `unavailable_reason`) when they
    cannot be used here."""
    return None if _turned_off else _load()


@contextlib.contextmanager
def turned_off() -> Iterator[None]:
    """Inside this block `library()` is None: modules built here use torch's kernels (to
    compare the two, or to measure what the native ones bring)."""
    global _turned_off
    _turned_off += 1
    try:
        yield
    finally:
        _turned_off -= 1


def reset() -> None:
    """Forget the loaded library and why it was unavailable: the next `library()` looks
    again (after the environment changed: `CC`, `PARROT_KERNELS`, the cache)."""
    _load.cache_clear()
    _unavailable.clear()


@functools.cache
def _load() -> Native | None:
    choice = os.environ.get("PARROT_KERNELS", "auto").strip().lower()
    if choice in ("torch", "off", "0", "none"):
        _unavailable.append("PARROT_KERNELS=torch turns them off")
        return None
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, BuildError) as err:
        _unavailable.append(str(err))
        return None
    _declare(lib)
    if lib.pk_version() != VERSION:
        _unavailable.append(f"{path} is version {lib.pk_version()}, not {VERSION}")
        return None
    bits = lib.pk_supported_isas()
    supported = [name for i, name in enumerate(ISA_NAMES) if bits & (1 << i)]
    working = [isa for isa in supported if isa == "generic" or _self_check(lib, isa)]
    best = working[-1]
    if choice in ISA_NAMES:  # PARROT_KERNELS=avx2: that instruction set, if this CPU runs it
        if choice not in working:
            _unavailable.append(f"PARROT_KERNELS={choice}, but this CPU runs {', '.join(working)}")
            return None
        best = choice
    lib.pk_select_isa(ISA_NAMES.index(best))
    return Native(lib, path, best, bool(lib.pk_openmp()), working)


class BuildError(RuntimeError):
    pass


def compiler() -> str | None:
    """The C compiler to build with: $CC (a command name or path), else cc / gcc / clang."""
    named = os.environ.get("CC")
    candidates = [named] if named else ["cc", "gcc", "clang"]
    for cc in candidates:
        found = shutil.which(cc)
        if found:
            return found
    return None


def kernel_cache_dir() -> Path:
    from parrot_cli.paths import cache_dir

    return cache_dir() / "kernels"


def build() -> Path:
    """The path of the built library, compiling it when the cache lacks this build."""
    cc = compiler()
    if cc is None:
        raise BuildError(f"no C compiler found ({os.environ.get('CC') or 'cc, gcc or clang'})")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"{cc} does not run ({err})") from err
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + " ".join(FLAGS).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    target = kernel_cache_dir() / f"parrot_kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-fopenmp"], []):  # without OpenMP the kernels run on one thread
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
        os.close(fd)
        try:
            result = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"],
                                    capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if result.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(result.stderr.strip().splitlines()[-1:] or ["failed"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BuildError(f"{cc} could not build {SOURCE.name}: {errors[-1][0]}")


def _declare(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    signatures = {
        "pk_version": ([], ctypes.c_int),
        "pk_supported_isas": ([], ctypes.c_int),
        "pk_select_isa": ([ctypes.c_int], ctypes.c_int),
        "pk_openmp": ([], ctypes.c_int),
        "pk_linear_forward": ([p, p, i64, p, ctypes.c_int], None),
        "pk_dequantize": ([p, i64, i64, p, ctypes.c_int], None),
        "pk_decode_step": ([p, i64, i32, p, p, i32, ctypes.c_int], ctypes.c_int),
        "pk_head_full": ([p, ctypes.c_int], None),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


# ------------------------------------------------------------------ weight descriptors


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def q4_group_ok(group: int, in_features: int) -> bool:
    """Group sizes the int4 kernels take: 32, 64, multiples of 128, or one group a row."""
    if in_features % 32 or group % 32:
        return False
    return group in (32, 64) or group % 128 == 0 or group == in_features


@dataclass
class Weight:
    """A `PkLinear` over torch tensors, which it keeps alive."""

    desc: PkLinear
    tensors: tuple

    @property
    def ref(self) -> ctypes._Pointer:
        return ctypes.byref(self.desc)


def dense_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Weight:
    """fp32 or bf16 [N, K]."""
    weight = weight.detach()
    if not weight.is_contiguous():
        raise ValueError("weights must be contiguous")
    kind = {torch.float32: F32, torch.bfloat16: BF16}[weight.dtype]
    n, k = weight.shape
    bias = _f32(bias)
    desc = PkLinear(kind, n, k, k, 0, 0, weight.data_ptr(), None, None, _ptr(bias), None)
    return Weight(desc, (weight, bias))


def int8_weight(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                perm: torch.Tensor | None = None) -> Weight:
    """int8 [N, K] with scales [N] or [N, G] (a matvec needs one scale per row)."""
    scales = _scale_tensor(scales.reshape(q.size(0), -1))
    n, k = q.shape
    group = k // scales.size(1)
    bias = _f32(bias)
    desc = PkLinear(Q8, n, k, group, _DTYPES[scales.dtype], 0, q.data_ptr(), scales.data_ptr(), None,
                    _ptr(bias), _ptr(perm))
    return Weight(desc, (q, scales, bias, perm))


def int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                qzeros: torch.Tensor | None, bias: torch.Tensor | None = None,
                perm: torch.Tensor | None = None) -> Weight:
    """Portable int4 (format.QuantizedWeight): uint8 [N, K/2], scales [N, G] and float zeros
    or integer qzeros [N, G]."""
    n, k = qweight.size(0), qweight.size(1) * 2
    scales = _scale_tensor(scales)
    zero = _scale_tensor(zeros) if qzeros is None else qzeros.contiguous()
    bias = _f32(bias)
    desc = PkLinear(Q4, n, k, k // scales.size(1), _DTYPES[scales.dtype], _DTYPES[zero.dtype],
                    qweight.data_ptr(), scales.data_ptr(), zero.data_ptr(), _ptr(bias), _ptr(perm))
    return Weight(desc, (qweight, scales, zero, bias, perm))


def _scale_tensor(t: torch.Tensor) -> torch.Tensor:
    """bf16 and fp32 as they are; fp16 (imported GPTQ) widened to fp32, exactly."""
    t = t.detach()
    if t.dtype not in (torch.bfloat16, torch.float32):
        t = t.float()
    return t.contiguous()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def threads() -> int:
    return torch.get_num_threads()


def linear_forward(native: Native, weight: Weight, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> fp32 [M, N] through the matrix-vector kernel (small M)."""
    x = x.float().contiguous()
    y = torch.empty(x.size(0), weight.desc.n, dtype=torch.float32)
    native.lib.pk_linear_forward(weight.ref, x.data_ptr(), x.size(0), y.data_ptr(), threads())
    return y


# fp32 tile of dequantized weights per dense matmul of a prefill (stays in L2/L3).
TILE_BYTES = 8 * 1024**2


def dense_forward(native: Native, weight: Weight, x: torch.Tensor) -> torch.Tensor:
    """x [M, K] (columns already in stored order) -> fp32 [M, N], dequantizing the weight
    tile by tile into fp32 for torch's dense matmul: a prefill runs at dense speed."""
    n, k = weight.desc.n, weight.desc.k
    x = x.float()
    rows = max(64, TILE_BYTES // (4 * k)) // 4 * 4
    tile = torch.empty(min(rows, n), k, dtype=torch.float32)
    out_t = torch.empty(n, x.size(0), dtype=torch.float32)  # y^T: each tile's rows contiguous
    xt = x.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        part = tile[: r1 - r0]
        native.lib.pk_dequantize(weight.ref, r0, r1, part.data_ptr(), threads())
        torch.mm(part, xt, out=out_t[r0:r1])
    return out_t.t()


def dequantize(native: Native, weight: Weight) -> torch.Tensor:
    """The whole weight in fp32 [N, K], stored column order (tests, small heads)."""
    out = torch.empty(weight.desc.n, weight.desc.k, dtype=torch.float32)
    native.lib.pk_dequantize(weight.ref, 0, weight.desc.n, out.data_ptr(), threads())
    return out


def _self_check(lib: ctypes.CDLL, isa: str) -> bool:
    """Does `isa` give the portable code's results on a small int4 / int8 / fp32 problem
    with awkward sizes (odd block counts, row tails)?"""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for n, k, group in ((13, 96, 32), (8, 256, 64), (5, 160, 160), (9, 512, 128)):
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        scales = (torch.rand(n, k // group, generator=gen) + 0.5).bfloat16()
        zeros = torch.randn(n, k // group, generator=gen).bfloat16()
        cases.append(int4_weight(packed, scales, zeros, None))
        cases.append(int4_weight(packed, scales.float(), None,
                                 torch.randint(0, 16, (n, k // group), generator=gen, dtype=torch.uint8)))
    q8 = torch.randint(-127, 128, (13, 200), generator=gen, dtype=torch.int8)
    cases.append(int8_weight(q8, torch.rand(13, generator=gen).bfloat16()))
    cases.append(dense_weight(torch.randn(7, 100, generator=gen)))
    cases.append(dense_weight(torch.randn(7, 100, generator=gen).bfloat16()))
    ok = True
    for w in cases:
        x = torch.randn(2, w.desc.k, generator=gen)
        outs = []
        for chosen in ("generic", isa):
            lib.pk_select_isa(ISA_NAMES.index(chosen))
            y = torch.empty(2, w.desc.n)
            lib.pk_linear_forward(w.ref, x.data_ptr(), 2, y.data_ptr(), 1)
            outs.append(y)
        scale = outs[0].abs().max().item() + 1
        ok &= bool((outs[0] - outs[1]).abs().max().item() <= 1e-4 * scale)
    lib.pk_select_isa(0)
    return ok


class WidenedLinear(torch.nn.Module):
    """A bf16 `nn.Linear` for CPUs without bf16 arithmetic (AVX2): torch emulates bf16
    matmuls there, ~4x slower than fp32. The weight stays bf16 (half the bytes a decode
    step reads, through the native kernels); a prefill's matmul runs in fp32 on weight tiles
    widened to fp32, and the result is rounded back to bf16."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._weight: Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = library()
        rows = x.reshape(-1, self.in_features)
        if self._weight is None or self._weight.tensors[0].data_ptr() != self.weight.data_ptr():
            self._weight = dense_weight(self.weight)
        if rows.size(0) <= 4:
            y = linear_forward(lib, self._weight, rows)
        else:
            y = dense_forward(lib, self._weight, rows)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 widened to fp32"


def widen_bf16_linears(model: torch.nn.Module) -> int:
    """Replace every bf16 nn.Linear of `model` by a WidenedLinear; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.bfloat16:
                setattr(parent, name, WidenedLinear(child))
                count += 1
    return count
