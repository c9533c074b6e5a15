"""Read llama-architecture GGUF files (llama.cpp's format) as the pieces of an HF checkpoint.

A GGUF file carries everything in one place: the model's hyper-parameters as key/value metadata,
the tokenizer's vocabulary and merges as metadata arrays, and the (often quantized) weights. This
module turns one into what the rest of parrot consumes: a transformers-style `config.json` dict, a
`tokenizers` `tokenizer.json`, a tokenizer config, a generation config, and a generator of float32
tensors named and laid out the way transformers names and lays out llama weights.

GGUF files come from anywhere, and `gguf.GGUFReader` trusts every length field it reads (a few
crafted bytes make it loop with unbounded memory growth or fail with raw IndexError/ValueError).
So `validate_gguf_header` walks the whole header with bounds checks first, and every failure of the
reader is wrapped into one readable `CheckpointError`.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch

from parrot_cli.checkpoint.gguf_header import (
    _BOOL_TYPE,
    _FLOAT_TYPES,
    _INT_TYPES,
    _TYPE_ARRAY,
    _TYPE_STRING,
    validate_gguf_header,
)
from parrot_cli.errors import CheckpointError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from parrot_cli.checkpoint.gguf_quant import GGUFWeight

__all__ = [
    "GGUFModel",
    "dequantize_tensor",
    "read_gguf",
    "validate_gguf_header",
]

# Every failure the gguf reader (numpy views over a memory map) can raise on a malformed file.
_READER_ERRORS = (
    ValueError,  # includes UnicodeDecodeError
    KeyError,
    IndexError,
    TypeError,
    OverflowError,
    MemoryError,
    struct.error,
    EOFError,
    OSError,
)

SUPPORTED_ARCHITECTURES = ("llama",)


# ============================================================================================
# Typed access to the reader's metadata
# ============================================================================================


def _float32_as_written(value: float) -> float:
    """The shortest decimal that rounds to this float32 (1e-05, not 9.999999747378752e-06).

    GGUF stores hyper-parameters such as rms_norm_eps as float32; the config.json they came from
    said 1e-05, and that is what transformers-style configs should carry.
    """
    return float(str(np.float32(value)))


class _Metadata:
    """Reads metadata values with their types checked, so a wrong type is a CheckpointError."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def _field(self, key: str, required: bool) -> Any | None:
        found = self.fields.get(key)
        if found is None and required:
            raise CheckpointError(f"{self.path} lacks the required metadata entry {key!r}.")
        return found

    def _wrong_type(self, key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{self.path} has metadata {key!r} that is not {expected}.")

    def _scalar(self, key: str, required: bool, types: frozenset[int], expected: str) -> Any:
        found = self._field(key, required)
        if found is None:
            return None
        if len(found.types) != 1 or int(found.types[0]) not in types:
            raise self._wrong_type(key, expected)
        try:
            return found.contents()
        except _READER_ERRORS as err:
            raise self._wrong_type(key, expected) from err

    def integer(self, key: str, required: bool = False) -> int | None:
        value = self._scalar(key, required, _INT_TYPES, "an integer")
        return None if value is None else int(value)

    def number(self, key: str, required: bool = False) -> float | None:
        found = self._field(key, required)
        value = self._scalar(key, required, _FLOAT_TYPES | _INT_TYPES, "a number")
        if value is None:
            return None
        if int(found.types[0]) == int(gguf.GGUFValueType.FLOAT32):
            return _float32_as_written(value)
        return float(value)

    def boolean(self, key: str, required: bool = False) -> bool | None:
        value = self._scalar(key, required, frozenset({_BOOL_TYPE}), "a boolean")
        return None if value is None else bool(value)

    def string(self, key: str, required: bool = False) -> str | None:
        return self._scalar(key, required, frozenset({_TYPE_STRING}), "a UTF-8 string")

    def _array(self, key: str, required: bool, types: frozenset[int], expected: str) -> Any:
        found = self._field(key, required)
        if found is None:
            return None
        if len(found.data) == 0 and len(found.types) == 1 and found.types[0] == _TYPE_ARRAY:
            return []  # an empty array carries no element type in the reader
        if len(found.types) != 2 or found.types[0] != _TYPE_ARRAY or found.types[1] not in types:
            raise self._wrong_type(key, expected)
        try:
            return found.contents()
        except _READER_ERRORS as err:
            raise self._wrong_type(key, expected) from err

    def strings(self, key: str, required: bool = False) -> list[str] | None:
        return self._array(key, required, frozenset({_TYPE_STRING}), "an array of UTF-8 strings")

    def integers(self, key: str, required: bool = False) -> list[int] | None:
        values = self._array(key, required, _INT_TYPES, "an array of integers")
        return None if values is None else [int(v) for v in values]


# ============================================================================================
# Config
# ============================================================================================


def _positive(meta: _Metadata, key: str, default: int | None = None) -> int:
    value = meta.integer(key, required=default is None)
    if value is None:
        value = default
    if value is None or value <= 0:
        raise CheckpointError(f"{meta.path} has metadata {key!r} = {value}; it must be positive.")
    return value


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any] | None:
    """transformers' rope_scaling dict from llama.cpp's rope.scaling.* keys (None if unscaled)."""
    prefix = f"{arch}.rope.scaling"
    kind = meta.string(f"{prefix}.type")
    factor = meta.number(f"{prefix}.factor")
    legacy_linear = meta.number(f"{arch}.rope.scale_linear")  # pre-2024 files
    if kind is None and legacy_linear is not None and legacy_linear != 1.0:
        return {"rope_type": "linear", "factor": legacy_linear}
    if kind is None or kind == "none":
        return None
    if factor is None:
        raise CheckpointError(f"{meta.path} sets {prefix}.type = {kind!r} without a factor.")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
        original = meta.integer(f"{prefix}.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for gguf_key, hf_key in (
            ("attn_factor", "attention_factor"),
            ("yarn_beta_fast", "beta_fast"),
            ("yarn_beta_slow", "beta_slow"),
        ):
            value = meta.number(f"{prefix}.{gguf_key}")
            if value is not None:
                scaling[hf_key] = value
        return scaling
    raise UnsupportedArchitectureError(
        f"{meta.path} uses RoPE scaling {kind!r}; parrot supports 'linear' and 'yarn'."
    )


@dataclass(frozen=True)
class _Dims:
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int


def _llama_dims(meta: _Metadata, vocab: int) -> _Dims:
    """Read and cross-check the shape hyper-parameters, so later reshapes cannot fail."""
    arch = "llama"
    hidden = _positive(meta, f"{arch}.embedding_length")
    n_heads = _positive(meta, f"{arch}.attention.head_count")
    n_kv_heads = _positive(meta, f"{arch}.attention.head_count_kv", default=n_heads)
    default_head_dim = hidden // n_heads if hidden % n_heads == 0 else None
    head_dim = _positive(meta, f"{arch}.attention.key_length", default=default_head_dim)
    value_dim = meta.integer(f"{arch}.attention.value_length")
    rope_dim = meta.integer(f"{arch}.rope.dimension_count")
    if n_heads % n_kv_heads:
        raise CheckpointError(
            f"{meta.path} has {n_heads} attention heads, not a multiple of {n_kv_heads} KV heads."
        )
    if head_dim % 2:
        raise CheckpointError(f"{meta.path} has an odd attention head size {head_dim}.")
    if value_dim is not None and value_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{meta.path} has different key and value head sizes, which llama models do not."
        )
    if rope_dim is not None and rope_dim != head_dim:
        raise UnsupportedArchitectureError(
            f"{meta.path} applies RoPE to {rope_dim} of {head_dim} head dimensions; "
            "parrot supports full-head RoPE only."
        )
    return _Dims(
        hidden=hidden,
        intermediate=_positive(meta, f"{arch}.feed_forward_length"),
        n_layers=_positive(meta, f"{arch}.block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab=vocab,
    )


# ============================================================================================
# Tensor naming and layout
# ============================================================================================


@dataclass(frozen=True)
class _TensorPlan:
    """Where one HF tensor comes from, its HF shape, and the heads for undoing the RoPE permute."""

    hf_name: str
    index: int
    shape: tuple[int, ...]
    unpermute_heads: int = 0


def _llama_tensor_table(dims: _Dims) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """GGUF name -> (HF name, HF shape, heads to un-permute or 0) for every tensor we accept."""
    q_rows = dims.n_heads * dims.head_dim
    kv_rows = dims.n_kv_heads * dims.head_dim
    table: dict[str, tuple[str, tuple[int, ...], int]] = {
        "token_embd.weight": ("model.embed_tokens.weight", (dims.vocab, dims.hidden), 0),
        "output_norm.weight": ("model.norm.weight", (dims.hidden,), 0),
        "output.weight": ("lm_head.weight", (dims.vocab, dims.hidden), 0),
    }
    h, ffn = dims.hidden, dims.intermediate
    for i in range(dims.n_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        entries = [
            ("attn_q.weight", f"{attn}.q_proj.weight", (q_rows, h), dims.n_heads),
            ("attn_k.weight", f"{attn}.k_proj.weight", (kv_rows, h), dims.n_kv_heads),
            ("attn_v.weight", f"{attn}.v_proj.weight", (kv_rows, h), 0),
            ("attn_output.weight", f"{attn}.o_proj.weight", (h, q_rows), 0),
            ("attn_q.bias", f"{attn}.q_proj.bias", (q_rows,), dims.n_heads),
            ("attn_k.bias", f"{attn}.k_proj.bias", (kv_rows,), dims.n_kv_heads),
            ("attn_v.bias", f"{attn}.v_proj.bias", (kv_rows,), 0),
            ("attn_output.bias", f"{attn}.o_proj.bias", (h,), 0),
            ("ffn_gate.weight", f"{mlp}.gate_proj.weight", (ffn, h), 0),
            ("ffn_up.weight", f"{mlp}.up_proj.weight", (ffn, h), 0),
            ("ffn_down.weight", f"{mlp}.down_proj.weight", (h, ffn), 0),
            ("attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", (h,), 0),
            ("ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", (h,), 0),
        ]
        table |= {f"blk.{i}.{suffix}": (hf, shape, heads) for suffix, hf, shape, heads in entries}
    return table


_OPTIONAL_TENSOR = re.compile(r"^(output\.weight|blk\.\d+\.attn_(q|k|v|output)\.bias)$")


def _plan_tensors(reader: Any, dims: _Dims, path: Path) -> tuple[list[_TensorPlan], bool]:
    """Map the file's tensors to HF names in HF order; also say whether attention has biases."""
    table = _llama_tensor_table(dims)
    by_name: dict[str, int] = {}
    for index, tensor in enumerate(reader.tensors):
        if tensor.name == "rope_freqs.weight":
            raise UnsupportedArchitectureError(
                f"{path} uses Llama-3.1-style RoPE frequency factors (rope_freqs.weight), "
                "which parrot does not support yet."
            )
        if tensor.name not in table:
            raise UnsupportedArchitectureError(
                f"{path} has tensor {tensor.name!r}, which is not part of a llama model."
            )
        by_name[tensor.name] = index

    biases = [name for name in by_name if name.endswith(".bias")]
    has_bias = bool(biases)
    if has_bias and len(biases) != 4 * dims.n_layers:
        # transformers' llama puts a bias on all four attention projections or on none.
        raise UnsupportedArchitectureError(
            f"{path} has biases on only some attention projections, which llama models do not."
        )

    plan: list[_TensorPlan] = []
    for gguf_name, (hf_name, shape, heads) in table.items():
        if gguf_name not in by_name:
            if _OPTIONAL_TENSOR.match(gguf_name):
                continue
            raise CheckpointError(f"{path} is missing tensor {gguf_name}.")
        tensor = reader.tensors[by_name[gguf_name]]
        file_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if file_shape != shape:
            raise CheckpointError(
                f"{path} has tensor {gguf_name} of shape {list(file_shape)}, but the model's "
                f"hyper-parameters need {list(shape)}."
            )
        plan.append(_TensorPlan(hf_name, by_name[gguf_name], shape, heads))
    return _hf_order(plan), has_bias


def _hf_order(plan: list[_TensorPlan]) -> list[_TensorPlan]:
    """Embeddings, then the layers in order, then the final norm and the head (as HF lists them)."""

    def key(item: _TensorPlan) -> tuple[int, int]:
        match = re.match(r"model\.layers\.(\d+)\.", item.hf_name)
        if match:
            return (1, int(match.group(1)))
        if item.hf_name == "model.embed_tokens.weight":
            return (0, 0)
        return (2, 0 if item.hf_name == "model.norm.weight" else 1)

    return sorted(plan, key=key)  # stable: keeps the table's order inside a layer


def _unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation llama.cpp's converter applies to q/k for its RoPE layout.

    transformers rotates the two halves of each head ([x0..x31 | x32..x63] for a 64-wide head);
    ggml rotates adjacent pairs (x0,x1), (x2,x3).... The converter therefore interleaves each
    head's halves: GGUF row 2*j + s of a head holds HF row s * head_dim/2 + j. Reading rows as
    (head, j, s) and swapping j and s restores the HF order.
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    restored = weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2)
    return restored.reshape(weight.shape).contiguous()


def dequantize_tensor(reader_tensor: Any) -> torch.Tensor:
    """Dequantize one `gguf.ReaderTensor` to a float32 tensor in its logical (HF) shape.

    GGUF lists dimensions fastest-first (ne[0] is the row length), so the logical shape is the
    reverse of the stored one. Any type `gguf.quants.dequantize` implements is accepted; others
    raise CheckpointError naming the type.
    """
    name = getattr(reader_tensor, "name", "?")
    qtype = reader_tensor.tensor_type
    type_name = getattr(qtype, "name", str(qtype))
    try:
        shape = tuple(int(d) for d in reversed(reader_tensor.shape.tolist()))
        values = gguf.quants.dequantize(reader_tensor.data, qtype)
        array = np.asarray(values, dtype=np.float32).reshape(shape)
    except NotImplementedError as err:
        raise CheckpointError(
            f"Tensor {name} is stored as {type_name}, which parrot cannot dequantize."
        ) from err
    except _READER_ERRORS as err:
        raise CheckpointError(f"Tensor {name} ({type_name}) could not be decoded: {err}.") from err
    if np.may_share_memory(array, reader_tensor.data) or not array.flags.writeable:
        # F32 "dequantizes" to a view of the read-only memory map: copy so the tensor owns its
        # memory and the caller can modify it.
        array = array.copy()
    return torch.from_numpy(array)


# ============================================================================================
# Tokenizer
# ============================================================================================

# llama.cpp token types (gguf.TokenType)
_TOKEN_NORMAL = int(gguf.TokenType.NORMAL)
_TOKEN_CONTROL = int(gguf.TokenType.CONTROL)
_TOKEN_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# Meta's Llama 3 split (case-insensitive contractions, numbers in groups of up to three).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre values, grouped by the pre-tokenization llama.cpp applies for them.
# Plain GPT-2 byte-level splitting; a file without the key is an old GPT-2-style file.
_PRE_GPT2 = frozenset({"", "default", "gpt2"})
# Every digit on its own first, then GPT-2 splitting: how SmolLM/StarCoder tokenizers were
# trained (their tokenizer.json has a Digits(individual_digits) pre-tokenizer before ByteLevel).
_PRE_DIGITS_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
# Llama 3 style; llama.cpp also looks whole words up before applying merges for these.
_PRE_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3"})


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[tuple[str, str]]
    pre: str
    bos_id: int | None
    eos_id: int
    extra_eos_ids: list[int]
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool


def _token_id(meta: _Metadata, key: str, n_tokens: int, required: bool = False) -> int | None:
    value = meta.integer(key, required=required)
    if value is not None and not 0 <= value < n_tokens:
        raise CheckpointError(
            f"{meta.path} sets {key} = {value}, outside its vocabulary of {n_tokens} tokens."
        )
    return value


def _read_vocab(meta: _Metadata) -> _Vocab:
    tokens = meta.strings("tokenizer.ggml.tokens", required=True) or []
    if not tokens:
        raise CheckpointError(f"{meta.path} has an empty tokenizer vocabulary.")
    types = meta.integers("tokenizer.ggml.token_type")
    if types is None:
        types = [_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{meta.path} lists {len(tokens)} tokens but {len(types)} token types."
        )
    raw_merges = meta.strings("tokenizer.ggml.merges")
    if not raw_merges:
        raise CheckpointError(f"{meta.path} has a BPE vocabulary without merges.")
    merges: list[tuple[str, str]] = []
    for merge in raw_merges:
        parts = merge.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise CheckpointError(f"{meta.path} has a malformed BPE merge {merge!r}.")
        merges.append((parts[0], parts[1]))

    n = len(tokens)
    eos_id = _token_id(meta, "tokenizer.ggml.eos_token_id", n, required=True)
    assert eos_id is not None  # required=True raised otherwise
    extra_eos = [
        token_id
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if (token_id := _token_id(meta, key, n)) is not None
    ]
    return _Vocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        pre=meta.string("tokenizer.ggml.pre") or "",
        bos_id=_token_id(meta, "tokenizer.ggml.bos_token_id", n),
        eos_id=eos_id,
        extra_eos_ids=extra_eos,
        pad_id=_token_id(meta, "tokenizer.ggml.padding_token_id", n),
        unk_id=_token_id(meta, "tokenizer.ggml.unknown_token_id", n),
        # llama.cpp's default for BPE vocabularies is not to add BOS unless the file says so.
        add_bos=bool(meta.boolean("tokenizer.ggml.add_bos_token")),
        add_eos=bool(meta.boolean("tokenizer.ggml.add_eos_token")),
    )


def _bpe_vocab(vocab: _Vocab) -> dict[str, int]:
    """Token -> id for the BPE model, every normal token spelled in the byte-level alphabet.

    Converters sometimes store a normal token as raw text (e.g. with a real space); such a token
    could never be produced by byte-level splitting, so it is respelled byte by byte. Control and
    user-defined tokens stay raw: they are matched as added tokens before BPE runs. A token that
    appears twice keeps its first id (the model could never produce the second one anyway).
    """
    alphabet = _byte_level_alphabet()
    allowed = set(alphabet.values())
    mapping: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True)):
        if token_type == _TOKEN_NORMAL and not set(token) <= allowed:
            token = "".join(alphabet[byte] for byte in token.encode("utf-8"))
        mapping.setdefault(token, index)
    return mapping


def _pre_tokenizer(pre: str, path: Path) -> tuple[Any, bool]:
    """The pre-tokenizer for this tokenizer.ggml.pre value, and whether BPE should ignore merges."""
    from tokenizers import Regex, pre_tokenizers

    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _PRE_DIGITS_GPT2:
        digits = pre_tokenizers.Digits(individual_digits=True)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return pre_tokenizers.Sequence([digits, byte_level]), False
    if pre in _PRE_LLAMA3:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([split, byte_level]), True
    raise UnsupportedArchitectureError(
        f"{path} uses the {pre!r} pre-tokenizer, which parrot does not support yet "
        "(supported: gpt2, smollm/starcoder-style and llama3-style)."
    )


def _post_processor(vocab: _Vocab) -> Any:
    """Byte-level offsets, plus BOS/EOS around each sequence when the file asks for them."""
    from tokenizers import processors

    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = vocab.tokens[vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else None
    eos = vocab.tokens[vocab.eos_id] if vocab.add_eos else None
    if bos is None and eos is None:
        return byte_level
    specials = {t: i for t, i in ((bos, vocab.bos_id), (eos, vocab.eos_id)) if t is not None}
    first = " ".join(x for x in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if x)
    second = " ".join(x for x in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if x)
    template = processors.TemplateProcessing(
        single=first, pair=f"{first} {second}", special_tokens=list(specials.items())
    )
    return processors.Sequence([byte_level, template])


def _added_tokens(vocab: _Vocab, token_type: int, special: bool) -> list[Any]:
    """The tokens of one llama.cpp type as `tokenizers` added tokens, matched as raw text."""
    from tokenizers import AddedToken

    return [
        AddedToken(token, special=special, normalized=False)
        for token, kind in zip(vocab.tokens, vocab.token_types, strict=True)
        if kind == token_type and token
    ]


def _build_tokenizer_json(vocab: _Vocab, path: Path) -> str:
    """A complete tokenizer.json for the `tokenizers` library, rebuilt from GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models

    pre_tokenizer, ignore_merges = _pre_tokenizer(vocab.pre, path)
    try:
        tokenizer = Tokenizer(
            models.BPE(
                vocab=_bpe_vocab(vocab),
                merges=vocab.merges,
                ignore_merges=ignore_merges,
                fuse_unk=False,
                byte_fallback=False,
            )
        )
        tokenizer.pre_tokenizer = pre_tokenizer
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = _post_processor(vocab)
        # CONTROL tokens (<|im_start|>, <|endoftext|>) are special: matched whole, skippable on
        # decode. USER_DEFINED ones (e.g. <think>) are matched whole too but are ordinary text
        # when decoding, as llama.cpp and transformers treat them.
        tokenizer.add_special_tokens(_added_tokens(vocab, _TOKEN_CONTROL, special=True))
        tokenizer.add_tokens(_added_tokens(vocab, _TOKEN_USER_DEFINED, special=False))
        return tokenizer.to_str()
    except BaseException as err:
        # `tokenizers` reports malformed vocabularies (e.g. a merge naming an unknown token) as a
        # bare Exception from Rust, and a Rust panic as pyo3's PanicException, which derives from
        # BaseException. Both mean the file's tokenizer is broken; anything else (Ctrl-C) is not.
        if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
            raise
        raise CheckpointError(f"{path} has a tokenizer that cannot be built: {err}.") from err


# ============================================================================================
# The model
# ============================================================================================


@dataclass
class GGUFModel:
    """Everything parrot needs from a GGUF file; weights are read lazily from its memory map."""

    hf_config: dict[str, Any]
    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    metadata: dict[str, Any]
    path: Path
    _reader: Any = field(repr=False)
    _plan: list[_TensorPlan] = field(repr=False)

    @property
    def n_tensors(self) -> int:
        """How many tensors `tensors()` yields (for a progress bar)."""
        return len(self._plan)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 tensor) one at a time, in HF layout and order.

        A generator so that only one dequantized tensor exists at a time: a 7B Q4 file is ~4 GB,
        but its float32 weights are ~28 GB.
        """
        for item in self._plan:
            tensor = dequantize_tensor(self._reader.tensors[item.index])
            if item.unpermute_heads:
                tensor = _unpermute_rope_rows(tensor, item.unpermute_heads)
            yield item.hf_name, tensor

    def weights(self) -> Iterator[tuple[str, GGUFWeight]]:
        """Yield (HF name, GGUFWeight) in HF order without decoding anything: the raw
        blocks on the memory map, for an import that keeps them quantized
        (`checkpoint/gguf_quant.py`)."""
        from parrot_cli.checkpoint.gguf_quant import GGUFPart, GGUFWeight

        for item in self._plan:
            t = self._reader.tensors[item.index]
            part = GGUFPart(t.name, t.tensor_type, t.data, item.shape, item.unpermute_heads)
            yield item.hf_name, GGUFWeight((part,))


def _open_reader(path: Path) -> Any:
    try:
        return gguf.GGUFReader(path, "r")
    except _READER_ERRORS as err:
        raise CheckpointError(f"{path} is not a valid GGUF file: {err}.") from err


def _check_supported(meta: _Metadata) -> str:
    arch = meta.string("general.architecture", required=True)
    assert arch is not None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{meta.path} is a {arch!r} model; parrot supports 'llama' GGUF files."
        )
    experts = meta.integer(f"{arch}.expert_count")
    if experts:
        raise UnsupportedArchitectureError(
            f"{meta.path} is a mixture-of-experts llama model ({experts} experts), "
            "which parrot does not support yet."
        )
    tokenizer_model = meta.string("tokenizer.ggml.model", required=True)
    if tokenizer_model == "llama":
        raise UnsupportedArchitectureError(
            "SentencePiece-vocabulary GGUF files are not supported yet; "
            "convert the original Hugging Face checkpoint instead."
        )
    if tokenizer_model != "gpt2":
        raise UnsupportedArchitectureError(
            f"{meta.path} uses the {tokenizer_model!r} tokenizer; parrot supports GGUF files "
            "with a GPT-2-style byte-level BPE vocabulary."
        )
    return arch


def _embedding_rows(reader: Any, path: Path) -> int:
    """Vocabulary size as the model sees it: the embedding's row count."""
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            shape = tensor.shape.tolist()
            if len(shape) != 2:
                raise CheckpointError(f"{path} has a token embedding that is not a matrix.")
            return int(shape[1])
    raise CheckpointError(f"{path} is missing tensor token_embd.weight.")


def _hf_config(
    meta: _Metadata, dims: _Dims, vocab: _Vocab, tied: bool, has_bias: bool
) -> dict[str, Any]:
    arch = "llama"
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": dims.hidden,
        "intermediate_size": dims.intermediate,
        "num_hidden_layers": dims.n_layers,
        "num_attention_heads": dims.n_heads,
        "num_key_value_heads": dims.n_kv_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": _positive(meta, f"{arch}.context_length"),
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon", required=True),
        "rope_theta": meta.number(f"{arch}.rope.freq_base") or 10000.0,
        "rope_scaling": _rope_scaling(meta, arch),
        "vocab_size": dims.vocab,
        "tie_word_embeddings": tied,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "attention_bias": has_bias,
        "mlp_bias": False,
    }
    if vocab.pad_id is not None:
        config["pad_token_id"] = vocab.pad_id
    return config


def _tokenizer_config(meta: _Metadata, vocab: _Vocab, context: int) -> dict[str, Any]:
    def token(token_id: int | None) -> str | None:
        return None if token_id is None else vocab.tokens[token_id]

    return {
        "bos_token": token(vocab.bos_id),
        "eos_token": vocab.tokens[vocab.eos_id],
        "pad_token": token(vocab.pad_id),
        "unk_token": token(vocab.unk_id),
        "chat_template": meta.string("tokenizer.chat_template"),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
    }


def _generation_config(vocab: _Vocab) -> dict[str, Any]:
    # End-of-turn tokens (e.g. Llama 3's <|eot_id|>) must stop generation just like EOS.
    eos_ids = list(dict.fromkeys([vocab.eos_id, *vocab.extra_eos_ids]))
    return {"bos_token_id": vocab.bos_id, "eos_token_id": eos_ids}


def _provenance(meta: _Metadata, reader: Any, arch: str) -> dict[str, Any]:
    file_type = meta.integer("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    return {
        "general.name": meta.string("general.name"),
        "general.architecture": arch,
        "file_type": file_type,
        "file_type_name": file_type_name,
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
    }


def read_gguf(path: Path) -> GGUFModel:
    """Validate and open a llama GGUF file; return its config, tokenizer and a lazy weight reader.

    Raises CheckpointError for a corrupt, truncated or inconsistent file, and
    UnsupportedArchitectureError for an architecture or tokenizer parrot does not implement.
    """
    path = Path(path)
    validate_gguf_header(path)
    reader = _open_reader(path)
    try:
        return _build_model(reader, path)
    except _READER_ERRORS as err:
        # The header walk catches malformed structure; this catches malformed content that the
        # reader only trips over lazily (e.g. a value it cannot convert).
        raise CheckpointError(f"{path} is not a valid GGUF file: {err}.") from err


def _build_model(reader: Any, path: Path) -> GGUFModel:
    meta = _Metadata(reader, path)
    arch = _check_supported(meta)
    vocab = _read_vocab(meta)
    vocab_rows = _embedding_rows(reader, path)
    declared = meta.integer(f"{arch}.vocab_size")
    if declared is not None and declared != vocab_rows:
        raise CheckpointError(
            f"{path} declares a vocabulary of {declared} but its embedding has {vocab_rows} rows."
        )
    if len(vocab.tokens) > vocab_rows:
        raise CheckpointError(
            f"{path} has {len(vocab.tokens)} tokens but embeddings for only {vocab_rows}."
        )
    dims = _llama_dims(meta, vocab_rows)
    plan, has_bias = _plan_tensors(reader, dims, path)
    tied = all(item.hf_name != "lm_head.weight" for item in plan)
    config = _hf_config(meta, dims, vocab, tied, has_bias)
    return GGUFModel(
        hf_config=config,
        tokenizer_json=_build_tokenizer_json(vocab, path),
        tokenizer_config=_tokenizer_config(meta, vocab, config["max_position_embeddings"]),
        generation_config=_generation_config(vocab),
        metadata=_provenance(meta, reader, arch),
        path=path,
        _reader=reader,
        _plan=plan,
    )
