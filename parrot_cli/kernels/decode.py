"""The fused single-token decode step: one native call a token over a loaded GPT's own
modules.

A decode step in torch is ~700 small calls (~1.4 ms of overhead on SmolLM2-135M, more
than its int4 weights take to read). `pk_decode_step` runs the whole token -- embedding,
every block (norms, one qkv product, RoPE in place, one cache write per layer, attention,
MLP), the final norm and the head -- in one call, on the weights the model's modules
already hold (nothing is copied but fp32 copies of the norms and biases) and on its own KV
cache, which the torch prefill fills. The model file is untouched: `GPT.forward` stays the
reference and runs every prefill, `llm.logits()` and any configuration this step does not
cover (batches, hooks, other kernels, other devices, a model whose modules were replaced
after loading, e.g. sharded by a multi-device strategy).

The head: a float head is mirrored by an int8 copy (a quarter of its fp32 bytes). Its
`N_CANDIDATES` best tokens are rescored exactly with the float head, and those provably
above every other token (each int8 logit is within err * |x|_1 of the exact one) are
returned: greedy and top-k sampling get exactly the logits they read from the float head;
when too few are proven, or sampling needs every logit, the exact head runs instead.
"""

from __future__ import annotations

import ctypes
import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from parrot_cli.kernels import native as nk
from parrot_cli.model import GPT, Block, CausalSelfAttention, GatedMLP, GeluMLP, RMSNorm

# Room for the candidates the fast head hands to exact rescoring: 4x the tokens sampling
# needs (at least 32), so top-k up to MAX_TOP reads only verified logits; beyond it, or when
# too few are verified, the exact head runs.
N_CANDIDATES = 257
MAX_TOP = 64
_ACTS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}
_decoders: weakref.WeakKeyDictionary[GPT, NativeDecoder] = weakref.WeakKeyDictionary()


class Unsupported(Exception):
    """What keeps a model off the fused step (the reason is its message)."""


@dataclass
class Scores:
    """What a fused step leaves for the sampler: every exact logit, or the `count`
    verified top tokens (exact logits, best first; `best` is the first id, read without a
    torch call so that a greedy step makes none)."""

    logits: torch.Tensor | None = None
    count: int = 0
    best: int = -1
    decoder: NativeDecoder | None = None

    @property
    def top_ids(self) -> torch.Tensor | None:
        return None if self.decoder is None else self.decoder.buffers["out_id"][: self.count]

    @property
    def top_values(self) -> torch.Tensor | None:
        return None if self.decoder is None else self.decoder.buffers["out_val"][: self.count]


def attach(model: GPT) -> str | None:
    """Give `model` a fused decode step; returns why not (None when attached)."""
    lib = nk.library()
    if lib is None:
        return f"native kernels unavailable: {nk.unavailable_reason()}"
    try:
        _decoders[model] = NativeDecoder(model, lib)
    except Unsupported as why:
        return str(why)
    return None


def detach(model: GPT) -> None:
    _decoders.pop(model, None)


def attached(model: nn.Module) -> NativeDecoder | None:
    """The fused step attached to `model` (unchecked: see `decoder_for`)."""
    return _decoders.get(model) if isinstance(model, GPT) else None


def decoder_for(model: nn.Module) -> NativeDecoder | None:
    """The fused step of `model`, if it has one and it still matches the model's modules and
    caches (checked once per generation)."""
    decoder = _decoders.get(model) if isinstance(model, GPT) else None
    if decoder is None:
        return None
    try:
        decoder.bind()
    except Unsupported:
        return None  # this generation runs the forward; the next one checks again
    return decoder


class NativeDecoder:
    """`pk_model` over one GPT's modules (see the module doc)."""

    def __init__(self, model: GPT, lib: nk.Native) -> None:
        self.lib = lib
        self.config = config = model.config
        if lib.openmp is False and torch.get_num_threads() > 1:
            raise Unsupported("the native kernels were built without OpenMP")
        self.model_ref = weakref.ref(model)
        self.blocks = list(model.transformer.h)
        self.max_threads = max(os.cpu_count() or 1, torch.get_num_threads())
        self.fallbacks = 0  # steps whose fast head could not vouch for enough tokens
        self.steps = 0
        E, H, G, hs = config.n_embd, config.n_head, config.n_query_groups, config.head_size
        inter = config.intermediate_size
        fc_rows = 2 * inter if config.mlp_class == "GatedMLP" else inter
        self.buffers = {
            "x": torch.zeros(E), "qkv": torch.zeros((H + 2 * G) * hs), "att": torch.zeros(H * hs),
            "hid": torch.zeros(fc_rows), "logits": torch.zeros(config.vocab_size),
            "part": torch.zeros(self.max_threads * H * (hs + 2)), "xf": torch.zeros(E),
            "cand_val": torch.zeros((self.max_threads + 1) * N_CANDIDATES),
            "cand_exact": torch.zeros(N_CANDIDATES + 1), "out_val": torch.zeros(N_CANDIDATES),
            "cand_id": torch.zeros((self.max_threads + 1) * N_CANDIDATES, dtype=torch.int32),
            "out_id": torch.zeros(N_CANDIDATES, dtype=torch.int32),
        }
        self._floats: dict[tuple[int, int], torch.Tensor] = {}
        self._dense: dict[tuple[int, int], nk.Weight] = {}
        self._fast_head: tuple[int, nk.Weight, float] | None = None
        self._keep: list = []
        self.rope = model.rope
        self._table = self
        self._table_rows = 0
        self._out_id = (ctypes.c_int32 * N_CANDIDATES).from_address(self.buffers["out_id"].data_ptr())
        self._step = lib.lib.pk_decode_step
        builder = PkModelBuilder(self)
        self._install(builder.build(model), self._current_fingerprint(model), builder.fast_pending)

    def _install(self, desc: nk.PkModel, fingerprint: tuple, fast_pending: torch.Tensor | None) -> None:
        self.desc = desc
        self._ref = ctypes.byref(desc)
        self._fast = desc.fast_head.kind >= 0
        self._fast_pending = fast_pending
        self._fingerprint = fingerprint

    def _build_fast_head(self) -> None:
        """The int8 mirror of the float head, made at the first step that can use it (not
        at load: the first token, from the prefill, does not wait for it)."""
        weight, err = self.fast_head(self._fast_pending)
        self.desc.fast_head, self.desc.fast_head_err = weight.desc, err.data_ptr()
        self._keep += [weight, err]
        self._fast, self._fast_pending = True, None

    # ------------------------------------------------------------------ binding

    def _current_fingerprint(self, model: GPT) -> tuple:
        """Identity of every module and tensor the descriptor points at: a change (a module
        swapped, weights moved, caches reallocated) means a rebuild."""
        parts: list = [id(m) for m in model.modules()]
        parts += [t.data_ptr() for t in model.parameters()]
        parts += [t.data_ptr() for t in model.buffers()]
        return tuple(parts)

    def bind(self) -> None:
        """Check the model is still the one described (rebuilding after a cache grew);
        raises Unsupported when it can no longer run fused."""
        model = self.model_ref()
        if model is None:
            raise Unsupported("the model is gone")
        fingerprint = self._current_fingerprint(model)
        if fingerprint != self._fingerprint:
            self._keep = []
            self.rope = model.rope
            builder = PkModelBuilder(self)
            self._install(builder.build(model), fingerprint, builder.fast_pending)
        if not model.cache_length:
            raise Unsupported("no KV cache")

    # ------------------------------------------------------------------ stepping

    def step(self, token: int, pos: int, want: int) -> Scores:
        """Decode `token` at `pos`. want = how many top tokens sampling reads (1 greedy, k
        for top-k), 0 = every logit."""
        rope = self.rope
        if rope.cos is not self._table:
            self._rope_table(rope)
        keep = None
        if pos < self._table_rows:
            cos, sin = self._cos + self._row_bytes * pos, self._sin + self._row_bytes * pos
        else:  # a length-dependent rope past its original context: its own table
            keep = tuple(t.float().contiguous() for t in rope.table(torch.tensor([pos]), pos + 1))
            cos, sin = keep[0].data_ptr(), keep[1].data_ptr()
        if want and self._fast_pending is not None:
            self._build_fast_head()
        if want > MAX_TOP or not self._fast:
            want = 0
        self.steps += 1
        got = self._step(self._ref, token, pos, cos, sin, want, torch.get_num_threads())
        del keep
        if want and got >= want:
            return Scores(count=got, best=self._out_id[0], decoder=self)
        if want:
            self.fallbacks += 1
            self.lib.lib.pk_head_full(self._ref, torch.get_num_threads())
        return Scores(logits=self.buffers["logits"])

    def _rope_table(self, rope) -> None:
        """Pointers into the model's cos/sin tables [positions, rope_n_elem] (fp32), for the
        positions whose rows a forward would read from them."""
        self._table = rope.cos
        if rope.cos is None or rope.cos.dtype != torch.float32:
            self._table_rows = 0
            return
        rows = rope.cos.size(0)
        if rope.length_dependent:
            rows = min(rows, rope.original_max)
        self._table_rows = rows
        self._row_bytes = rope.cos.size(1) * 4
        self._cos, self._sin = rope.cos.data_ptr(), rope.sin.data_ptr()

    # ------------------------------------------------------------------ sizes

    def mirror_bytes(self) -> int:
        """Memory of the int8 mirror of a float head (made at the first decode step)."""
        head = self.model_ref().lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            return 0
        vocab, width = head.weight.shape
        return vocab * width + vocab * (2 + 4)  # int8 codes, bf16 scales, fp32 row errors

    def bytes_per_token(self) -> int:
        """Weight bytes one greedy or top-k step reads: every block's, one embedding row,
        the final norm, and the head it runs (a float head's int8 mirror; the few rows it
        rescores are left out). The KV cache is not counted."""
        model = self.model_ref()

        def held(module: nn.Module) -> int:
            own = sum(p.numel() * p.element_size() for p in module.parameters())
            return own + sum(getattr(m, "nbytes", 0) for m in module.modules() if isinstance(getattr(m, "nbytes", None), int))

        total = sum(held(block) for block in model.transformer.h) + held(model.transformer.ln_f)
        wte = model.transformer.wte
        table = held(wte)
        total += table // self.config.vocab_size  # one row
        mirror = self.mirror_bytes()
        if mirror:
            return total + mirror
        head = held(model.lm_head)
        return total + (head or table)  # a tied quantized head reads the embedding's codes

    # ------------------------------------------------------------------ cached pieces

    def f32(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """An fp32 contiguous copy of a small tensor (norm weights, biases), cached."""
        if t is None:
            return None
        key = (t.data_ptr(), t.dtype.itemsize)
        if key not in self._floats:
            self._floats[key] = t.detach().float().contiguous()
        return self._floats[key]

    def dense(self, weight: torch.Tensor) -> nk.Weight:
        key = (weight.data_ptr(), weight.dtype.itemsize)
        if key not in self._dense:
            self._dense[key] = nk.dense_weight(weight)
        return self._dense[key]

    def fast_head(self, weight: torch.Tensor) -> tuple[nk.Weight, torch.Tensor]:
        """int8 mirror of a float head (per-channel scales) and, per row, the largest
        |w - dequant(q)| (fp32 [vocab]), which bounds how far its logits can be off."""
        if self._fast_head is None or self._fast_head[0] != weight.data_ptr():
            from parrot_cli.quantize.weight_only import quantize_int8

            qs, ss, errs = [], [], []
            for chunk in weight.detach().split(8192):
                qw = quantize_int8(chunk)
                errs.append((chunk.float() - qw.dequantize()).abs().amax(dim=1))
                qs.append(qw.data)
                ss.append(qw.scales)
            desc = nk.int8_weight(torch.cat(qs), torch.cat(ss))
            self._fast_head = (weight.data_ptr(), desc, torch.cat(errs).contiguous())
        return self._fast_head[1], self._fast_head[2]


class PkModelBuilder:
    """Fills a `pk_model` from a GPT, or raises Unsupported naming what it lacks."""

    def __init__(self, decoder: NativeDecoder) -> None:
        self.d = decoder
        self.fast_pending: torch.Tensor | None = None  # a float head to mirror in int8

    def build(self, model: GPT) -> nk.PkModel:
        d, c = self.d, self.d.config
        if next(model.parameters()).device.type != "cpu":
            raise Unsupported("the fused step runs on CPU")
        hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            raise Unsupported(f"module {hooked[0] or 'model'} has forward hooks")
        if not all(type(b) is Block for b in model.transformer.h):
            raise Unsupported("its blocks are not parrot's Block")
        if c.head_size % 2 or c.rope_n_elem % 2:
            raise Unsupported("odd head or rotary size")
        desc = nk.PkModel()
        desc.n_layer, desc.n_embd, desc.n_head, desc.n_kv = c.n_layer, c.n_embd, c.n_head, c.n_query_groups
        desc.head_size, desc.rope_n_elem, desc.inter, desc.vocab = (
            c.head_size, c.rope_n_elem, c.intermediate_size, c.vocab_size)
        desc.norm_kind = 0 if c.norm_class == "RMSNorm" else 1
        desc.mlp_kind = 1 if c.mlp_class == "GatedMLP" else 0
        desc.act = _ACTS[c.activation]
        desc.parallel_residual = int(c.parallel_residual)
        desc.window = c.sliding_window or 0
        desc.max_threads, desc.n_cand = d.max_threads, N_CANDIDATES
        desc.norm_eps, desc.attn_scale = c.norm_eps, 1.0 / math.sqrt(c.head_size)
        layers = (nk.PkLayer * c.n_layer)()
        cache_len = 0
        for i, block in enumerate(model.transformer.h):
            cache_len = self.layer(layers[i], block, i, cache_len)
        desc.cache_len = cache_len
        desc.layers = ctypes.addressof(layers)
        d._keep.append(layers)
        desc.emb = self.embedding(model.transformer.wte)
        desc.lnf_w, desc.lnf_b = self.norm(model.transformer.ln_f)
        head = model.lm_head
        desc.head = self.linear(head)
        desc.fast_head.kind = -1  # until the first step that wants it (NativeDecoder.step)
        if type(head) is nn.Linear and head.bias is None:
            self.fast_pending = head.weight
        for name, t in d.buffers.items():
            setattr(desc, name, t.data_ptr())
        return desc

    def layer(self, out: nk.PkLayer, block: Block, i: int, cache_len: int) -> int:
        attn, mlp = block.attn, block.mlp
        if type(attn) is not CausalSelfAttention or type(mlp) not in (GatedMLP, GeluMLP):
            raise Unsupported(f"block {i} has modules the fused step does not know")
        act = mlp.act
        expected = {"gelu": (nn.GELU, "none"), "gelu_tanh": (nn.GELU, "tanh"),
                    "relu": (nn.ReLU, None), "silu": (nn.SiLU, None)}[self.d.config.activation]
        if type(act) is not expected[0] or getattr(act, "approximate", None) != expected[1]:
            raise Unsupported(f"block {i} has another activation")
        if attn.n_head != self.d.config.n_head or attn.n_kv != self.d.config.n_query_groups:
            raise Unsupported(f"block {i} holds a share of the heads")
        out.qkv, out.proj = self.linear(attn.qkv), self.linear(attn.proj)
        out.fc, out.mproj = self.linear(mlp.fc), self.linear(mlp.proj)
        out.n1w, out.n1b = self.norm(block.norm_1)
        out.n2w, out.n2b = self.norm(block.norm_2) if block.norm_2 is not None else (None, None)
        cache = attn.kv_cache
        if cache is not None:
            if cache.k.dtype != torch.float32 or not (cache.k.is_contiguous() and cache.v.is_contiguous()):
                raise Unsupported("the KV cache is not fp32")
            out.kc, out.vc = cache.k.data_ptr(), cache.v.data_ptr()
            cache_len = cache.k.size(2)
        return cache_len

    def linear(self, module: nn.Module) -> nk.PkLinear:
        from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear

        if type(module) in (nn.Linear, nk.WidenedLinear):
            if module.weight.dtype not in (torch.float32, torch.bfloat16) or not module.weight.is_contiguous():
                raise Unsupported(f"a {module.weight.dtype} linear")
            weight = self.d.dense(module.weight)
        elif isinstance(module, Int4Linear | Int8Linear) and module.backend == "native":
            weight = module.native_weight()
        else:
            raise Unsupported(f"{type(module).__name__} layers")
        desc = nk.PkLinear.from_buffer_copy(weight.desc)
        bias = self.d.f32(module.bias)
        desc.bias = None if bias is None else bias.data_ptr()
        self.d._keep.append(weight)
        return desc

    def norm(self, module: nn.Module) -> tuple[int | None, int | None]:
        c = self.d.config
        if type(module) is RMSNorm and c.norm_class == "RMSNorm":
            bias = None
        elif type(module) is nn.LayerNorm and c.norm_class == "LayerNorm" and module.weight is not None:
            bias = module.bias
        else:
            raise Unsupported(f"{type(module).__name__} norms")
        if module.eps != c.norm_eps:
            raise Unsupported("norms with another eps")
        w, b = self.d.f32(module.weight), self.d.f32(bias)
        return w.data_ptr(), None if b is None else b.data_ptr()

    def embedding(self, module: nn.Module) -> nk.PkLinear:
        from parrot_cli.quantize.weight_only import QuantizedEmbedding

        if type(module) is nn.Embedding:
            weight = self.d.dense(module.weight)
        elif isinstance(module, QuantizedEmbedding):
            if module.bits == 8:
                weight = nk.int8_weight(module.qweight, module.scales)
            else:
                weight = nk.int4_weight(module.qweight, module.scales, module.zeros, module.qzeros)
        else:
            raise Unsupported(f"{type(module).__name__} embeddings")
        self.d._keep.append(weight)
        return nk.PkLinear.from_buffer_copy(weight.desc)
