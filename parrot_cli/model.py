"""The one model definition for every supported family.

`GPT(config)` is a decoder-only transformer; families differ by config flags (parallel
residual, shared attention norm, norm class, MLP class, GQA via `n_query_groups`, rotary
fraction and scaling). The model knows nothing of files, flags, tokenizers or quantization.
Its whole interface: `setup_caches(batch_size, max_seq_length)` then
`forward(idx, input_pos)`; `forward(idx)` without `input_pos` is a full, cache-free pass.

Weight layout (what checkpoint conversion produces):
  transformer.wte.weight                [vocab, n_embd]
  transformer.h.{i}.norm_1 / norm_2     LayerNorm or RMSNorm (norm_2 absent when shared)
  transformer.h.{i}.attn.qkv.weight     [(n_head + 2 * n_query_groups) * head_size, n_embd], rows [q; k; v]
  transformer.h.{i}.attn.proj.weight    [n_embd, n_head * head_size]
  transformer.h.{i}.mlp.fc.weight       [intermediate (x2 for gated: [gate; up]), n_embd]
  transformer.h.{i}.mlp.proj.weight     [n_embd, intermediate]
  transformer.ln_f                      final norm
  lm_head.weight                        [vocab, n_embd] (absent on disk when tied)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parrot_cli.config import Config


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                "ln_f": make_norm(config),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.rope = RotaryEmbedding(config)
        self.max_seq_length = config.block_size
        self.cache_length = 0  # 0 = no KV cache set up

    def setup_caches(
        self,
        batch_size: int,
        max_seq_length: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Allocate one static KV buffer per layer. Explicit, never a side effect of forward."""
        param = self.transformer.ln_f.weight  # norms are never quantized: the working dtype
        device = device or param.device
        dtype = dtype or (param.dtype if param.is_floating_point() else torch.float32)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(self.config, batch_size, max_seq_length, device, dtype)
        self.cache_length = max_seq_length
        self.rope.build(max(max_seq_length, 1), device)

    def clear_caches(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.cache_length = 0

    def forward(
        self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """idx: [B, T] token ids. input_pos: [T] absolute positions (needs caches), or None
        for a full causal pass from position 0 that reads and writes no cache.
        Returns logits [B, T, vocab], or [B, 1, vocab] for the last position with
        `last_only` (what a prefill samples from: the head of the other positions is ~20%
        of a small model's prefill work)."""
        T = idx.size(1)
        if input_pos is None:
            positions = torch.arange(T, device=idx.device)
            cos, sin = self.rope(positions, seq_len=T)
            kv_len = T
        else:
            if not self.cache_length:
                raise RuntimeError("call setup_caches() before forward with input_pos")
            kv_len = int(input_pos[-1]) + 1
            cos, sin = self.rope(input_pos, seq_len=kv_len)
        mask = attention_mask(input_pos, kv_len, self.config.sliding_window, idx.device)
        x = self.transformer.wte(idx)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # as the reference: rotate in the working dtype
        for block in self.transformer.h:
            x = block(x, cos, sin, input_pos, kv_len, mask)
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        return self.lm_head(x)


def attention_mask(
    input_pos: torch.Tensor | None, kv_len: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [T, kv_len] mask (True = attend), or None when SDPA's own causal flag or
    "attend to the whole prefix" already says it. Query i sits at input_pos[i]; it may see
    key j when j <= pos_i and, with a sliding window, pos_i - j < window."""
    if input_pos is None:
        if window is None or window >= kv_len:
            return None  # is_causal covers it
        q_pos = torch.arange(kv_len, device=device)
    else:
        q_pos = input_pos
        if q_pos.numel() == 1 and (window is None or window >= kv_len):
            return None  # one query at the end of the prefix sees all of it
    k_pos = torch.arange(kv_len, device=device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


class Block(nn.Module):
    """One transformer layer. Parallel: x + attn(n1(x)) + mlp(n2(x) or n1(x)).
    Sequential: h = x + attn(n1(x)); h + mlp(n2(h))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.norm_2 = None if config.shared_attention_norm else make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp = GatedMLP(config) if config.mlp_class == "GatedMLP" else GeluMLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        kv_len: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        n1 = self.norm_1(x)
        h = self.attn(n1, cos, sin, input_pos, kv_len, mask)
        if self.parallel_residual:
            n2 = n1 if self.norm_2 is None else self.norm_2(x)
            return x + h + self.mlp(n2)
        x = x + h
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        q, k, v = config.qkv_sizes
        self.qkv = nn.Linear(config.n_embd, q + k + v, bias=config.qkv_bias)
        self.proj = nn.Linear(q, config.n_embd, bias=config.proj_bias)
        self.n_head = config.n_head
        self.n_kv = config.n_query_groups
        self.head_size = config.head_size
        self.rope_n_elem = config.rope_n_elem
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None,
        kv_len: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hs = self.head_size
        q, k, v = self.qkv(x).split((self.n_head * hs, self.n_kv * hs, self.n_kv * hs), dim=-1)
        # [B, T, heads * hs] -> [B, heads, T, hs]
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_kv, hs).transpose(1, 2)
        v = v.view(B, T, self.n_kv, hs).transpose(1, 2)
        q = apply_rope(q, cos, sin, self.rope_n_elem)
        k = apply_rope(k, cos, sin, self.rope_n_elem)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)
            if T == 1 and mask is None:
                return self.proj(self._decode_attention(q, k, v).reshape(B, 1, self.n_head * hs))
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another dtype
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and input_pos is None and T > 1,
            scale=1.0 / math.sqrt(hs),
            enable_gqa=self.n_kv != self.n_head,
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * hs)
        return self.proj(y)


    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query token against the cached prefix, as two batched matmuls with the query
        heads grouped under their kv head (no repeated k/v, no SDPA dispatch: at T=1 the
        fused kernel's overhead is most of its cost). q: [B, H, 1, hs]; k, v: [B, G, L, hs]."""
        B, G, dtype = q.size(0), self.n_kv, q.dtype
        q = q.view(B, G, self.n_head // G, self.head_size).to(k.dtype)  # [B, G, H/G, hs]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_size))
        probs = scores.float().softmax(dim=-1).to(v.dtype)  # [B, G, H/G, L]
        return torch.matmul(probs, v).to(dtype)  # [B, G, H/G, hs] == heads in order


class KVCache(nn.Module):
    """Static per-layer key/value buffers [B, n_kv, max_seq, head_size]: allocated once,
    written in place, so repeated generations reuse the same memory."""

    def __init__(
        self, config: Config, batch_size: int, max_seq_length: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (batch_size, config.n_query_groups, max_seq_length, config.head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v at input_pos; return the cached prefix [.., :kv_len, ..] to attend to."""
        B = k.size(0)
        self.k[:B, :, input_pos] = k.to(self.k.dtype)
        self.v[:B, :, input_pos] = v.to(self.v.dtype)
        return self.k[:B, :, :kv_len], self.v[:B, :, :kv_len]


class GeluMLP(nn.Module):
    """GPT-NeoX / Falcon MLP: proj(act(fc(x)))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class GatedMLP(nn.Module):
    """Llama MLP: proj(act(gate(x)) * up(x)); gate and up fused in one matmul ([gate; up])."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)
        self.act = activation(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(self.act(gate) * up)


def activation(name: str) -> nn.Module:
    return {
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "relu": nn.ReLU(),
        "silu": nn.SiLU(),
    }[name]


class RMSNorm(nn.Module):
    """Llama RMSNorm, normalising in float32 whatever the working precision (as the
    reference does), then scaling in the input dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.size(-1),), None, self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "RMSNorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


# --------------------------------------------------------------------------- rotary


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_elem: int) -> torch.Tensor:
    """Rotate the first n_elem dims of each head, "rotate half" convention (GPT-NeoX, Falcon
    and HF Llama layout). x: [B, H, T, hs]; cos/sin: [T, n_elem]."""
    if n_elem == 0:
        return x
    rot, rest = (x, None) if n_elem == x.size(-1) else (x[..., :n_elem], x[..., n_elem:])
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = (rot * cos + rotated * sin).to(x.dtype)
    return out if rest is None else torch.cat((out, rest), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every rope scaling type parrot supports.

    Static types (default, linear, yarn, llama3) use one table built for the cache length.
    "dynamic" (NTK) and "longrope" change their frequencies with the sequence length, as
    the reference does: their tables are recomputed when a forward reaches past the
    original context (see `inv_freq`)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.dim = config.rope_n_elem
        scaling = config.rope_scaling or {}
        self.rope_type = scaling.get("rope_type", "default")
        self.original_max = int(scaling.get("original_max_position_embeddings") or config.block_size)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.length_dependent = self.rope_type in ("dynamic", "longrope")

    def inv_freq(self, seq_len: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        """(inverse frequencies [dim/2], attention factor) for a forward covering seq_len positions."""
        cfg, dim, base = self.config, self.dim, self.config.rope_base
        s = cfg.rope_scaling or {}
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        plain = 1.0 / (base**exponents)
        kind = self.rope_type
        if kind == "default":
            return plain, 1.0
        if kind == "linear":
            return plain / s["factor"], 1.0
        if kind == "dynamic":
            max_pos = cfg.block_size
            seq_len = max(seq_len, max_pos)
            factor = s["factor"]
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            return 1.0 / (base**exponents), 1.0
        if kind == "llama3":
            return _llama3_inv_freq(plain, s, self.original_max), 1.0
        if kind == "yarn":
            return _yarn_inv_freq(exponents, base, s, cfg.block_size, self.original_max, dim)
        if kind == "longrope":
            factor = s.get("factor") or cfg.block_size / self.original_max
            attention = s.get("attention_factor")
            if attention is None:
                attention = (
                    1.0
                    if factor <= 1.0
                    else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
                )
            ext = s["long_factor"] if seq_len > self.original_max else s["short_factor"]
            ext_t = torch.tensor(ext, dtype=torch.float32, device=device)
            return 1.0 / (ext_t * base**exponents), float(attention)
        raise ValueError(f"unknown rope type {kind}")

    def table(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, attention = self.inv_freq(seq_len, positions.device)
        freqs = torch.outer(positions.float(), inv_freq)  # [T, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, dim]
        return emb.cos() * attention, emb.sin() * attention

    def build(self, length: int, device: torch.device) -> None:
        """Precompute the table for positions [0, length). Length-dependent types get the
        unscaled table here; `forward` recomputes once a pass reaches past the original context."""
        seq_len = min(length, self.original_max) if self.length_dependent else length
        self.cos, self.sin = self.table(torch.arange(length, device=device), seq_len)

    def forward(self, positions: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, dim] for the given positions of a forward whose keys span seq_len."""
        static = not self.length_dependent or seq_len <= self.original_max
        if static and self.cos is not None and int(positions.max()) < self.cos.size(0):
            return self.cos[positions], self.sin[positions]
        return self.table(positions, seq_len)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict, old_context: int) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(
    exponents: torch.Tensor, base: float, s: dict, max_pos: int, original_max: int, dim: int
) -> tuple[torch.Tensor, float]:
    factor = s.get("factor") or max_pos / original_max

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    pos_freqs = base**exponents
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(exponents.device)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)
