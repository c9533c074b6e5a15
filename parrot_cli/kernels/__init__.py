"""Faster kernels for the device a model runs on.

- `onednn`: oneDNN-prepacked linears (`PackedLinear`), the CPU path when the native
  kernels are unavailable.
- `native`: parrot's own C kernels (int4/int8/bf16/fp32 matrix-vector products, the fused
  decode step), compiled once with the system's C compiler and loaded with ctypes; every
  caller falls back to torch's kernels when they cannot be built.
- `decode`: the fused single-token decode step over a loaded model's own modules.
"""

from parrot_cli.kernels.onednn import PackedLinear, can_pack, pack_linears

__all__ = ["PackedLinear", "can_pack", "pack_linears"]
