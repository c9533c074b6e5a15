"""Tiny, randomly initialised `transformers` checkpoints for logit-parity tests.

Every case in `CASES` names one architecture variant (GPT-NeoX, Falcon, Llama, Mistral) by the
kwargs of its `transformers` config class (transformers 5 spelling: RoPE settings live in a
`rope_parameters` dict). `build` makes the model with transformers, gives every parameter a random
non-trivial value (norm weights ~ 1 + 0.1 * randn, every bias ~ 0.1 * randn, linear weights
~ N(0, 1 / fan_in) so attention is far from uniform and RoPE visibly matters) and saves it with
`save_pretrained` in float32. `build_bin` and `build_sharded` write the same weights as
`pytorch_model.bin` or as several safetensors shards with an index. `hf_logits` is the reference.

Nothing here downloads anything: models are built from configs alone, and no tokenizer is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAMILIES = ("gpt_neox", "falcon", "llama", "mistral")

# Shared tiny sizes. head_dim = 64 / 4 = 16 unless a case says otherwise.
_VOCAB = 112
_HIDDEN = 64
_HEADS = 4
_LAYERS = 2
_INTER = 96
_MAXPOS = 32


@dataclass(frozen=True)
class Case:
    """One tiny architecture variant."""

    id: str
    family: str
    config_kwargs: dict[str, Any] = field(hash=False)
    beyond_context: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}")

    @property
    def max_position_embeddings(self) -> int:
        return int(self.config_kwargs["max_position_embeddings"])

    @property
    def vocab_size(self) -> int:
        return int(self.config_kwargs["vocab_size"])

    @property
    def tied(self) -> bool:
        """Whether lm_head shares the input embedding (then lm_head is absent from the files)."""
        default = self.family == "falcon"  # FalconConfig defaults to True, the others to False
        return bool(self.config_kwargs.get("tie_word_embeddings", default))

    def test_length(self) -> int:
        """Sequence length the parity tests should use for this case."""
        return self.max_position_embeddings + 8 if self.beyond_context else 12


def _neox(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "intermediate_size": 128,
        "max_position_embeddings": _MAXPOS,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "attention_bias": True,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
    base.update(kw)
    return base


def _falcon(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "ffn_hidden_size": 128,
        "max_position_embeddings": _MAXPOS,
        "layer_norm_epsilon": 1e-5,
        "activation": "gelu",
        "alibi": False,
        "bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(kw)
    return base


def _llama(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": 2,
        "intermediate_size": _INTER,
        "max_position_embeddings": _MAXPOS,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(kw)
    return base


def _mistral(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "vocab_size": _VOCAB,
        "hidden_size": _HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": 2,
        "intermediate_size": _INTER,
        "max_position_embeddings": _MAXPOS,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    base.update(kw)
    return base


def _rope(rope_type: str, theta: float = 10000.0, **kw: Any) -> dict[str, Any]:
    return {"rope_type": rope_type, "rope_theta": theta, **kw}


# head_dim 16 -> longrope factor lists have head_dim // 2 = 8 entries.
_SHORT = [1.0, 1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.7]
_LONG = [1.0, 1.3, 1.8, 2.5, 3.5, 5.0, 7.0, 9.5]

CASES: list[Case] = [
    # ---------------------------------------------------------------- GPT-NeoX
    Case(
        "neox-parallel-rot25",
        "gpt_neox",
        _neox(),
        notes="Pythia/RedPajama: parallel residual, rotary on first 25% of head dims, gelu (erf)",
    ),
    Case(
        "neox-sequential-rot100",
        "gpt_neox",
        _neox(
            use_parallel_residual=False,
            hidden_act="gelu_new",
            layer_norm_eps=1e-6,
            rope_parameters=_rope("default", 10000.0, partial_rotary_factor=1.0),
        ),
        notes="StableLM-alpha style: sequential residual, full rotary, gelu_new (tanh approx)",
    ),
    Case(
        "neox-tied-rot50-gelufast",
        "gpt_neox",
        _neox(
            tie_word_embeddings=True,
            hidden_act="gelu_fast",
            intermediate_size=96,
            rope_parameters=_rope("default", 500.0, partial_rotary_factor=0.5),
        ),
        notes="tied lm_head (lm_head.weight is not saved), rotary 50%, gelu_fast, theta 500",
    ),
    Case(
        "neox-nobias",
        "gpt_neox",
        _neox(attention_bias=False, num_attention_heads=8),
        notes="attention_bias=False (qkv and dense lose bias; MLP keeps its biases), 8 heads of 8",
    ),
    Case(
        "neox-dynamic-rot25",
        "gpt_neox",
        _neox(rope_parameters=_rope("dynamic", 10000.0, partial_rotary_factor=0.25, factor=2.0)),
        beyond_context=True,
        notes="dynamic NTK on a partial rotary (dim = int(head_dim * 0.25) = 4)",
    ),
    # ---------------------------------------------------------------- Falcon
    Case(
        "falcon-7b-mqa",
        "falcon",
        _falcon(multi_query=True, parallel_attn=True, new_decoder_architecture=False),
        notes="falcon-7b: multi-query (1 kv head), parallel attn+mlp sharing input_layernorm, "
        "no biases, tied lm_head",
    ),
    Case(
        "falcon-40b-newarch-ln2",
        "falcon",
        _falcon(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2),
        notes="falcon-40b: grouped qkv, 4 heads / 2 kv heads, ln_attn + ln_mlp",
    ),
    Case(
        "falcon-11b-newarch-ln1",
        "falcon",
        _falcon(
            new_decoder_architecture=True,
            num_kv_heads=2,
            num_ln_in_parallel_attn=1,
            ffn_hidden_size=96,
            tie_word_embeddings=False,
            rope_parameters=_rope("default", 500042.0),
        ),
        notes="falcon2-11B: grouped qkv, one input_layernorm shared by attn and mlp, "
        "untied lm_head, ffn_hidden_size != 4*hidden, theta 500042",
    ),
    Case(
        "falcon-newarch-kv1",
        "falcon",
        _falcon(new_decoder_architecture=True, num_kv_heads=1, num_ln_in_parallel_attn=2),
        notes="new decoder architecture with a single kv group (4 q + k + v per group)",
    ),
    Case(
        "falcon-sequential-bias",
        "falcon",
        _falcon(multi_query=False, parallel_attn=False, new_decoder_architecture=False, bias=True),
        notes="non-parallel (input_layernorm -> attn, post_attention_layernorm -> mlp), MHA "
        "with per-head interleaved qkv, all Linear biases, tied lm_head",
    ),
    Case(
        "falcon-parallel-mha-untied",
        "falcon",
        _falcon(
            multi_query=False,
            parallel_attn=True,
            new_decoder_architecture=False,
            bias=True,
            tie_word_embeddings=False,
        ),
        notes="parallel attn, MHA per-head interleaved qkv, biases, untied lm_head",
    ),
    # ---------------------------------------------------------------- Llama
    Case(
        "llama-mha", "llama", _llama(num_key_value_heads=4), notes="MHA (kv heads == heads), untied"
    ),
    Case(
        "llama-gqa-tied",
        "llama",
        _llama(
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters=_rope("default", 500000.0),
        ),
        notes="GQA 4/2, tied lm_head (not saved), theta 500000",
    ),
    Case("llama-mqa", "llama", _llama(num_key_value_heads=1), notes="MQA (1 kv head)"),
    Case(
        "llama-bias",
        "llama",
        _llama(attention_bias=True, mlp_bias=True),
        notes="attention_bias: q/k/v/o_proj biases; mlp_bias: gate/up/down_proj biases",
    ),
    Case(
        "llama-headdim24",
        "llama",
        _llama(head_dim=24, num_key_value_heads=2),
        notes="explicit head_dim 24 != hidden/heads 16: q_proj [96, 64], o_proj [64, 96]",
    ),
    Case(
        "llama-rope-linear",
        "llama",
        _llama(rope_parameters=_rope("linear", 10000.0, factor=2.0)),
        beyond_context=True,
        notes="linear position interpolation: inv_freq / factor",
    ),
    Case(
        "llama-rope-dynamic",
        "llama",
        _llama(rope_parameters=_rope("dynamic", 10000.0, factor=2.0)),
        beyond_context=True,
        notes="dynamic NTK: base rescaled from max(position_ids)+1 when it exceeds max_pos",
    ),
    Case(
        "llama-rope-yarn",
        "llama",
        _llama(
            rope_parameters=_rope("yarn", 10000.0, factor=2.0, original_max_position_embeddings=16)
        ),
        beyond_context=True,
        notes="YaRN, default beta_fast 32 / beta_slow 1, truncate, attention_factor "
        "0.1*ln(2)+1 multiplies cos and sin",
    ),
    Case(
        "llama-rope-yarn-notrunc",
        "llama",
        _llama(
            max_position_embeddings=64,
            rope_parameters=_rope(
                "yarn",
                1000.0,
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=8.0,
                beta_slow=0.5,
                truncate=False,
                mscale=1.0,
                mscale_all_dim=0.5,
            ),
        ),
        beyond_context=True,
        notes="YaRN with explicit betas, truncate=False and mscale/mscale_all_dim",
    ),
    Case(
        "llama-rope-llama3",
        "llama",
        _llama(
            max_position_embeddings=64,
            rope_parameters=_rope(
                "llama3",
                10000.0,
                factor=2.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        beyond_context=True,
        notes="llama3: wavelen<8 kept, >32 divided by factor, in between smoothed "
        "(all three regions occur with head_dim 16)",
    ),
    Case(
        "llama-rope-longrope",
        "llama",
        _llama(
            rope_parameters=_rope(
                "longrope",
                10000.0,
                factor=2.0,
                original_max_position_embeddings=16,
                short_factor=_SHORT,
                long_factor=_LONG,
            )
        ),
        beyond_context=True,
        notes="longrope: long_factor for the whole forward once max(position_ids)+1 > 16, "
        "attention_factor sqrt(1 + ln(2)/ln(16)) multiplies cos and sin",
    ),
    # ---------------------------------------------------------------- Mistral
    Case(
        "mistral-gqa", "mistral", _mistral(sliding_window=None), notes="GQA 4/2, no sliding window"
    ),
    Case(
        "mistral-gqa-sw8",
        "mistral",
        _mistral(sliding_window=8),
        notes="sliding window 8 < 12 test tokens: query i sees keys j with i-8 < j <= i",
    ),
    Case(
        "mistral-headdim-sw4-tied",
        "mistral",
        _mistral(
            head_dim=24,
            num_key_value_heads=1,
            sliding_window=4,
            tie_word_embeddings=True,
            rope_parameters=_rope("default", 1000000.0),
        ),
        notes="Nemo-like explicit head_dim 24, MQA, sliding window 4, tied lm_head, theta 1e6",
    ),
]

CASES_BY_ID: dict[str, Case] = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case ids"


# --------------------------------------------------------------------------- building


def make_config(case: Case) -> Any:
    """The transformers config object for `case` (a fresh deep copy of its kwargs)."""
    from transformers import AutoConfig

    kwargs = json.loads(json.dumps(case.config_kwargs))  # deep copy: configs mutate dicts
    return AutoConfig.for_model(case.family, **kwargs)


def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a random, non-trivial value (shared/tied tensors only once)."""
    done: set[int] = set()

    def fill(p: torch.Tensor | None, make: Any) -> None:
        if p is None or id(p) in done:
            return
        done.add(id(p))
        with torch.no_grad():
            p.copy_(make(p.shape))

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = 1.0 / math.sqrt(module.in_features)
            fill(module.weight, lambda s, std=std: randn(s) * std)
            fill(module.bias, lambda s: 0.1 * randn(s))
        elif isinstance(module, nn.Embedding):
            fill(module.weight, lambda s: randn(s))
        elif isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
            fill(module.weight, lambda s: 1.0 + 0.1 * randn(s))
            fill(getattr(module, "bias", None), lambda s: 0.1 * randn(s))

    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise RuntimeError(f"parameters left un-randomised: {missed}")


def make_model(case: Case, *, seed: int = 0) -> nn.Module:
    """The randomised float32 eval-mode `*ForCausalLM` for `case` (not saved)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(case)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    )
    gen = torch.Generator().manual_seed(seed)
    _randomise(model, gen)
    if config.tie_word_embeddings:
        emb = model.get_input_embeddings().weight
        if model.get_output_embeddings().weight is not emb:
            raise RuntimeError(f"{case.id}: tie_word_embeddings=True but lm_head is not tied")
    return model.eval()


def build(
    case: Case, out_dir: Path, *, seed: int = 0, max_shard_size: int | str | None = None
) -> Path:
    """Build `case` and save it to `out_dir` (config.json + model.safetensors). Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = make_model(case, seed=seed)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


# Buffers old transformers (<4.31/4.35) wrote into pytorch_model.bin; converters must skip them.
def _legacy_buffers(case: Case, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cfg = case.config_kwargs
    n_layers = int(cfg["num_hidden_layers"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    extra: dict[str, torch.Tensor] = {}
    if case.family == "gpt_neox":
        rot = int(head_dim * cfg["rope_parameters"].get("partial_rotary_factor", 0.25))
        inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2).float() / rot))
        n = int(cfg["max_position_embeddings"])
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        for i in range(n_layers):
            p = f"gpt_neox.layers.{i}.attention."
            extra[p + "bias"] = causal.clone()
            extra[p + "masked_bias"] = torch.tensor(-1e9)
            extra[p + "rotary_emb.inv_freq"] = inv.clone()
    elif case.family in ("llama", "mistral"):
        inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for i in range(n_layers):
            extra[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv.clone()
    return {**state, **extra}


def build_bin(case: Case, out_dir: Path, *, seed: int = 0, legacy_buffers: bool = False) -> Path:
    """Like `build`, but the weights are a single torch-pickled `pytorch_model.bin`.

    transformers 5 can no longer write .bin files, so this saves with safetensors and re-writes the
    same state dict with `torch.save`. With `legacy_buffers=True` the non-persistent buffers that
    old checkpoints carried (NeoX `attention.bias`/`masked_bias`/`rotary_emb.inv_freq`, Llama and
    Mistral `self_attn.rotary_emb.inv_freq`) are added, as in e.g. Pythia or Llama-2 .bin files.
    """
    from safetensors.torch import load_file

    out_dir = build(case, out_dir, seed=seed)
    st = out_dir / "model.safetensors"
    state = load_file(st)
    st.unlink()
    if legacy_buffers:
        state = _legacy_buffers(case, state)
    torch.save(state, out_dir / "pytorch_model.bin")
    return out_dir


def build_sharded(case: Case, out_dir: Path, *, seed: int = 0) -> Path:
    """Like `build`, but as >= 2 safetensors shards plus `model.safetensors.index.json`."""
    total = largest = 0
    for p in make_model(case, seed=seed).state_dict().values():
        total += p.numel() * p.element_size()
        largest = max(largest, p.numel() * p.element_size())
    out_dir = build(case, out_dir, seed=seed, max_shard_size=max(total // 3, largest))
    shards = list(out_dir.glob("model-*-of-*.safetensors"))
    if len(shards) < 2 or not (out_dir / "model.safetensors.index.json").exists():
        found = sorted(p.name for p in out_dir.iterdir())
        raise RuntimeError(f"{case.id}: expected a sharded checkpoint, got {found}")
    return out_dir


# --------------------------------------------------------------------------- reference


def load_hf(model_dir: Path) -> nn.Module:
    """Load a saved case with transformers: float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        Path(model_dir), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def hf_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Reference logits [len(ids), vocab] for one full (cache-less) forward over `ids`.

    The model is loaded fresh on every call because dynamic/longrope RoPE keep state between
    forwards (the inv_freq buffer is updated in place).
    """
    model = load_hf(model_dir)
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


def hf_logits_incremental(model_dir: Path, ids: list[int], prefill: int = 1) -> torch.Tensor:
    """Reference logits [len(ids), vocab] computed with a KV cache: `ids[:prefill]` in one forward,
    then one token per forward. Equals `hf_logits` except for dynamic-NTK / longrope RoPE once the
    sequence outgrows max_position_embeddings / original_max_position_embeddings (cached keys keep
    the rotation they were computed with)."""
    model = load_hf(model_dir)
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        out = model(torch.tensor([ids[:prefill]], dtype=torch.long), use_cache=True)
        rows.append(out.logits[0])
        cache = out.cache
        for tok in ids[prefill:]:
            out = model(torch.tensor([[tok]], dtype=torch.long), cache=cache, use_cache=True)
            cache = out.cache
            rows.append(out.logits[0])
    return torch.cat(rows).float()


def sample_ids(case: Case, length: int | None = None, *, seed: int = 1) -> list[int]:
    """Deterministic random token ids for `case` (default length `case.test_length()`)."""
    n = case.test_length() if length is None else length
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, case.vocab_size, (n,), generator=gen).tolist()
