"""GPTQ for one Linear: 4-bit codes that minimise the layer's output error on calibration
inputs, not the weights' own rounding error.

For a Linear y = x W^T with calibration inputs X, GPTQ minimises ||X W^T - X Q^T||^2. That
splits into one problem per output row sharing one matrix, the Hessian H = 2/n X^T X
[K, K], so it depends on the inputs only: Linears that read the same input (the fused
[q; k; v] and [gate; up]) are quantized as one matrix with one H, which is exactly what
quantizing the parts separately would give (research/gptq.md §1.7).

The columns (inputs) are quantized one at a time; each column's rounding error is spread
over the columns not yet quantized in proportion to H^-1 (the optimal-brain-surgeon
update). With the upper Cholesky factor U of H^-1 (H^-1 = U^T U), row i of U from column i
on is exactly the update for column i given that columns < i are fixed, so no inverse is
ever re-computed. Updates are applied lazily: within a block of `block_size` columns one
rank-1 update per column, and one matrix product for the rest of the row per block.

What this implementation does on purpose:
- group parameters (scale, zero) are taken when the loop enters each group, from the
  weights as updated by all the error spread before it (blocks are a multiple of the
  group size, so the group lies wholly inside the current, fully updated block);
- scales are rounded to their storage dtype (bf16, what the kernel reads) *before* any
  code is rounded against them, and the integer codes come out of the loop itself, so the
  stored weight is exactly what the loop chose (never re-derived from floats);
- inputs never active in calibration ("dead" columns, diag(H) = 0) get weight 0;
- damping (`damp` x mean(diag H) added to the diagonal) is raised and retried when the
  Cholesky factorisation fails, and the damping used is reported;
- act-order processes the inputs by decreasing diag(H) and stores the weight in that
  order with its permutation (`QuantizedWeight.perm`): the kernel gathers x[..., perm],
  so groups stay contiguous and nothing is dequantized per call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from parrot_cli.errors import ParrotError
from parrot_cli.quantize.format import QuantizedWeight, pack_nibbles

MAXQ = 15  # 4-bit codes 0..15
SYM_ZERO = 8  # the zero point of symmetric 4-bit: w = s * (q - 8)
SCALE_DTYPE = torch.bfloat16  # what the int4 kernels read
MIN_SCALE = 1e-8  # an all-zero group still gets a positive scale
MAX_DAMP = 1.0  # relative damping beyond which a Hessian is hopeless
BLOCK_SIZE = 128


class QuantizationError(ParrotError):
    """GPTQ could not quantize a layer (its Hessian stays singular at any damping)."""


class Hessian:
    """H = 2/n sum over the n calibration tokens of x x^T, accumulated in float32 on the
    inputs' device. The scale does not change GPTQ's result (damping is relative to
    mean(diag H) and the updates use ratios of H^-1 entries); it makes the reported error
    a mean over tokens."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.matrix = torch.zeros(size, size, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., K]."""
        rows = x.reshape(-1, x.size(-1)).float()
        self.matrix.addmm_(rows.T, rows)
        self.tokens += rows.size(0)

    def finish(self) -> torch.Tensor:
        if not self.tokens:
            raise QuantizationError("A layer saw no calibration tokens.")
        return self.matrix.mul_(2.0 / self.tokens)

    def take(self) -> torch.Tensor:
        """The finished matrix, handed over: this accumulator no longer holds it (GPTQ
        consumes it in place, so only one reference may exist)."""
        matrix = self.finish()
        self.matrix = None
        return matrix

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * 4


@dataclass
class GPTQResult:
    """One quantized Linear and what it took."""

    weight: QuantizedWeight
    damp: float  # the relative damping that succeeded
    retries: int  # how many times damping had to be raised
    dead: int  # inputs never active in calibration
    error: float  # relative output error tr(E H E^T) / tr(W H W^T), E = W - dequant(Q)
    baseline_error: float | None = None  # the same for the `baseline` approximation


# Fractions of a group's range tried as its quantization range (the "MSE grid" of the
# reference implementation, coarser): clipping the extremes often lowers the error of the
# other values more than it costs the clipped ones.
RANGE_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def group_params(
    w: torch.Tensor, sym: bool, min_zero: int = 0, shrink: tuple[float, ...] = RANGE_SHRINK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N] rounded to the storage dtype, integer zero [N]) for the columns w [N, g]
    of one group, so that w ~= scale * (q - zero) with q in 0..15.

    The range always includes 0. Symmetric: zero 8 and scale 2 max|w| / 15 (codes cover
    -8..7 steps). Asymmetric: scale (max - min) / 15 and zero round(-min / scale), clamped
    to min_zero..15 (1..15 keeps a Hugging Face "v1" file exact: it stores zero - 1). Of
    the ranges shrunk by each factor of `shrink`, each row keeps the one whose rounded
    values are closest to w."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    best = None
    for p in shrink:
        scale, zero = _range_params(lo * p, hi * p, sym, min_zero)
        q = torch.round(w / scale[:, None]).add_(zero[:, None]).clamp_(0, MAXQ)
        err = (scale[:, None] * (q - zero[:, None]) - w).pow_(2).sum(dim=1)
        if best is None:
            best = (scale, zero, err)
            continue
        better = err < best[2]
        best = (torch.where(better, scale, best[0]), torch.where(better, zero, best[1]),
                torch.minimum(err, best[2]))
    return best[0], best[1]


def _range_params(lo: torch.Tensor, hi: torch.Tensor, sym: bool, min_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sym:
        scale = 2 * torch.maximum(-lo, hi) / MAXQ
    else:
        scale = (hi - lo) / MAXQ
    scale = scale.clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()
    if sym:
        zero = torch.full_like(scale, SYM_ZERO)
    else:
        zero = torch.round(-lo / scale).clamp(min_zero, MAXQ)
    return scale, zero


def relative_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H E^T) / tr(W H W^T) with E = W - approx: the mean squared output error of the
    approximation over the calibration inputs, relative to the output's mean square."""
    w = weight.float()
    e = w - approx.float()
    num = ((e @ hessian) * e).sum()
    den = ((w @ hessian) * w).sum()
    return float(num / den) if float(den) > 0 else 0.0


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    damp: float = 0.01,
    min_zero: int = 0,
    block_size: int = BLOCK_SIZE,
    baseline: torch.Tensor | None = None,
    on_retry=None,
) -> GPTQResult:
    """Quantize `weight` [N, K] to 4 bits against `hessian` [K, K] (float32, undamped).

    The Hessian is *consumed*: it is modified in place and freed as soon as it is factored
    (pass it as an expression, e.g. `acc.take()`, so no caller keeps it alive), which keeps
    the peak at three K x K matrices (the largest: Llama-70B's down_proj, K = 28672, 3.3 GB
    each). The reported errors are measured through its Cholesky factor instead. `baseline`
    (another approximation of `weight`, e.g. RTN's) gets its error measured the same way.
    `group_size` must divide K (K itself: one group per output row). Runs on the tensors'
    device. `on_retry(damp)` is called when damping has to be raised."""
    n, k = weight.shape
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide {k} inputs")
    groups = k // group_size
    device = weight.device
    with _exact_matmuls(device):
        # Work on W^T [K, N]: a column of W (one input) is then a contiguous row, and the
        # per-column rank-1 updates run on contiguous memory (4-10x faster on CPU).
        wt = weight.float().T.contiguous()
        h = hessian
        del hessian
        dead = torch.diag(h) == 0
        h[dead, dead] = 1
        wt[dead] = 0
        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(h), descending=True, stable=True)
            if torch.equal(perm, torch.arange(k, device=device)):
                perm = None  # already in order: store it plainly
            else:
                wt, h = wt[perm], h[perm][:, perm]
        lower, u, used, added, retries = _inverse_factor(h, damp, on_retry)
        del h  # (H + added * I) = lower @ lower^T from here on

        codes = torch.empty(k, n, dtype=torch.uint8, device=device)  # transposed, as wt
        scales = torch.empty(groups, n, dtype=torch.float32, device=device)
        zeros = torch.empty(groups, n, dtype=torch.float32, device=device)
        # Blocks hold whole groups, so each group's parameters see all updates before it.
        step = max(block_size // group_size, 1) * group_size if group_size < k else block_size
        if group_size == k:
            scales[0], zeros[0] = group_params(wt.T, sym, min_zero)
        for i1 in range(0, k, step):
            i2 = min(i1 + step, k)
            w1 = wt[i1:i2].clone()  # [B, N]
            u1 = u[i1:i2, i1:i2]
            err1 = torch.empty_like(w1)
            scale = zero = None
            with _one_thread(device):  # tiny ops: threads only add synchronisation
                for i in range(i2 - i1):
                    col = i1 + i
                    g = col // group_size
                    if group_size < k and col % group_size == 0:
                        scales[g], zeros[g] = group_params(w1[i : i + group_size].T, sym, min_zero)
                    if scale is None or col % group_size == 0:
                        scale, zero = scales[g], zeros[g]
                    x = w1[i]
                    q = torch.round(x / scale).add_(zero).clamp_(0, MAXQ)
                    codes[col] = q.to(torch.uint8)
                    e = (x - scale * (q - zero)) / u1[i, i]
                    w1[i:].addr_(u1[i, i:], e, alpha=-1)  # the rest of the block, row by row
                    err1[i] = e
            if i2 < k:
                wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1)  # the lazy batch update
        del u, wt
        codes, scales, zeros = codes.T, scales.T, zeros.T  # [N, K], [N, G]
        _check_range(codes, zeros)  # before packing: a wrapped nibble would go unnoticed
        qw = QuantizedWeight(
            4,
            pack_nibbles(codes.contiguous()),
            scales.to(SCALE_DTYPE).contiguous(),
            qzeros=zeros.to(torch.uint8).contiguous(),
            perm=None if perm is None else perm.to(torch.int64),
        )
        measure = _ErrorMeter(weight, lower, added, dead, perm)
        error = measure(qw.dequantize())
        baseline_error = None if baseline is None else measure(baseline)
        del lower
    return GPTQResult(qw, used, retries, int(dead.sum()), error, baseline_error)


class _ErrorMeter:
    """tr(E H E^T) / tr(W H W^T) for approximations of W, from the Cholesky factor L of the
    damped, reordered Hessian: tr(E H E^T) = ||E L||^2 - added * ||E||^2. Inputs never
    active in calibration (dead) contribute nothing, as their rows of H are zero."""

    def __init__(self, weight: torch.Tensor, lower: torch.Tensor, added: float,
                 dead: torch.Tensor, perm: torch.Tensor | None) -> None:
        self.lower, self.added, self.dead, self.perm = lower, added, dead, perm
        self.weight = self._arrange(weight.float())
        self.denominator = self._quadratic(self.weight)

    def _arrange(self, w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w[:, self.dead] = 0
        return w if self.perm is None else w[:, self.perm]

    def _quadratic(self, e: torch.Tensor) -> float:
        return float((e @ self.lower).double().pow(2).sum() - self.added * e.double().pow(2).sum())

    def __call__(self, approx: torch.Tensor) -> float:
        if self.denominator <= 0:
            return 0.0
        error = self.weight - self._arrange(approx.to(self.weight.device).float())
        return max(self._quadratic(error), 0.0) / self.denominator


def _inverse_factor(h: torch.Tensor, damp: float, on_retry):
    """(L, U, relative damping, absolute damping added, retries): H + added * I = L L^T and
    U the upper Cholesky factor of its inverse, with added = damp * mean(diag H). The
    damping is doubled while the factorisation fails; H is damped in place."""
    if not 0 < damp < MAX_DAMP:
        raise ValueError(f"damping {damp} is outside (0, {MAX_DAMP})")
    diagonal = h.diagonal()
    mean = float(diagonal.mean())
    current, retries, added = damp, 0, 0.0
    while True:
        diagonal.add_(current * mean - added)
        added = current * mean
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return lower, upper, current, added, retries
            del upper
        del lower
        if current >= MAX_DAMP:
            raise QuantizationError(
                f"The calibration Hessian stays singular even with damping {current:g}; "
                "use more calibration --samples or a longer --seq-len."
            )
        current, retries = min(current * 2, MAX_DAMP), retries + 1
        if on_retry is not None:
            on_retry(current)


def _check_range(codes: torch.Tensor, zeros: torch.Tensor) -> None:
    """Packing an out-of-range value would wrap it into its neighbour's nibble; the loop
    clamps, so this only guards against a future change breaking that."""
    if int(codes.max()) > MAXQ or float(zeros.min()) < 0 or float(zeros.max()) > MAXQ:
        raise RuntimeError("GPTQ produced a 4-bit code or zero point outside 0..15")
    if not math.isfinite(float(zeros.sum())):
        raise RuntimeError("GPTQ produced a non-finite zero point")


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """The column loop runs thousands of vector-sized ops: on CPU, spreading each over
    threads costs more in synchronisation than it gains (10x slower on a busy 2-core
    machine); the big matmuls outside it keep every thread."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _exact_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 matmuls (an Ampere default in some setups) visibly hurt GPTQ: keep fp32 exact."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
