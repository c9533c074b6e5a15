"""Tests for parrot_cli.checkpoint.gguf: GGUF header validation, config, tokenizer and weights.

Small GGUF files are written with `gguf.GGUFWriter` so every path (quantization types, crafted
headers, unsupported models) runs without downloads; the real SmolLM2 GGUF is compared against
what transformers loads from the same file.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from parrot_cli.checkpoint.gguf import (
    GGUFModel,
    dequantize_tensor,
    read_gguf,
    validate_gguf_header,
)
from parrot_cli.errors import CheckpointError, UnsupportedArchitectureError
from tests.data.gpt2_bytes import gpt2_byte_alphabet

# ============================================================================================
# Tiny GGUF files
# ============================================================================================


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGED = ["Ġt", "he", "Ġthe", "in"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
TOKENS = [*SPECIALS, *gpt2_byte_alphabet(), *MERGED, "<think>"]
TOKEN_TYPES = [3, 3, 3] + [1] * (256 + len(MERGED)) + [4]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"

# Byte offsets of the fp16 scale fields inside one block, for types we fill with random bytes:
# random bits there could be NaN/inf, which would make the comparison meaningless.
F16_FIELDS: dict[Q, tuple[int, ...]] = {
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
    Q.IQ4_NL: (0,),
    Q.Q8_1: (0, 2),
}


@dataclass
class TinySpec:
    """What goes into a tiny llama GGUF. Defaults make a valid SmolLM-like file."""

    arch: str = "llama"
    tokenizer_model: str = "gpt2"
    pre: str | None = "smollm"
    hidden: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn: int = 128
    n_layers: int = 2
    weight_type: Q = Q.F32
    with_output: bool = False
    add_bos: bool = False
    extra_kv: dict[str, Any] = field(default_factory=dict)
    skip_tensors: tuple[str, ...] = ()
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


def quantized_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of a (rows, cols) tensor in `qtype`: real quantization where gguf has it."""
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype in (Q.F32, Q.F16):
        return values.astype(np.float16 if qtype == Q.F16 else np.float32)
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        pass
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(rows, cols // block)).astype(np.float16)
    for offset in F16_FIELDS[qtype]:
        raw[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def llama_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of q/k rows (HF halves -> interleaved pairs)."""
    rows = weight.shape[0]
    out = np.empty_like(weight)
    head_dim = rows // n_heads
    for h in range(n_heads):
        for j in range(head_dim // 2):
            for s in range(2):
                out[h * head_dim + 2 * j + s] = weight[h * head_dim + s * head_dim // 2 + j]
    return out


def tiny_tensors(spec: TinySpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GGUF name -> array to write (HF logical shapes; quantized ones as raw bytes)."""
    h, ffn, vocab = spec.hidden, spec.ffn, len(TOKENS)
    q_rows, kv_rows = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim

    def weight(rows: int, cols: int) -> np.ndarray:
        return quantized_blocks(spec.weight_type, rows, cols, rng)

    def norm() -> np.ndarray:
        return rng.uniform(0.5, 1.5, size=h).astype(np.float32)

    tensors = {"token_embd.weight": weight(vocab, h), "output_norm.weight": norm()}
    if spec.with_output:
        tensors["output.weight"] = weight(vocab, h)
    for i in range(spec.n_layers):
        tensors |= {
            f"blk.{i}.attn_norm.weight": norm(),
            f"blk.{i}.attn_q.weight": weight(q_rows, h),
            f"blk.{i}.attn_k.weight": weight(kv_rows, h),
            f"blk.{i}.attn_v.weight": weight(kv_rows, h),
            f"blk.{i}.attn_output.weight": weight(h, q_rows),
            f"blk.{i}.ffn_norm.weight": norm(),
            f"blk.{i}.ffn_gate.weight": weight(ffn, h),
            f"blk.{i}.ffn_up.weight": weight(ffn, h),
            f"blk.{i}.ffn_down.weight": weight(h, ffn),
        }
    tensors |= spec.extra_tensors
    return {k: v for k, v in tensors.items() if k not in spec.skip_tensors}


def write_tiny_gguf(path: Path, spec: TinySpec | None = None, seed: int = 0) -> dict[str, Any]:
    """Write a small llama GGUF; return what was written (GGUF name -> array)."""
    spec = spec or TinySpec()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), spec.arch)
    a = spec.arch
    writer.add_string("general.name", "tiny")
    writer.add_uint32(f"{a}.block_count", spec.n_layers)
    writer.add_uint32(f"{a}.context_length", 256)
    writer.add_uint32(f"{a}.embedding_length", spec.hidden)
    writer.add_uint32(f"{a}.feed_forward_length", spec.ffn)
    writer.add_uint32(f"{a}.attention.head_count", spec.n_heads)
    writer.add_uint32(f"{a}.attention.head_count_kv", spec.n_kv_heads)
    writer.add_float32(f"{a}.rope.freq_base", 10000.0)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_uint32(f"{a}.rope.dimension_count", spec.head_dim)
    writer.add_uint32(f"{a}.vocab_size", len(TOKENS))
    writer.add_tokenizer_model(spec.tokenizer_model)
    if spec.pre is not None:
        writer.add_tokenizer_pre(spec.pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(spec.add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in spec.extra_kv.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    tensors = tiny_tensors(spec, rng)
    for name, array in tensors.items():
        raw_dtype = None if array.dtype in (np.float32, np.float16) else spec.weight_type
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def tiny_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def header_end(path: Path) -> int:
    """Where tensor data starts: everything before it is header."""
    return int(gguf.GGUFReader(path).data_offset)


# ============================================================================================
# The real SmolLM2 file against transformers
# ============================================================================================

SMOLLM2_TEXTS = [
    "Hello world! 123",
    "  multiple   spaces",
    "Café déjà vu. Ünïcödé ñ ç ß",
    "def f(x):\n    return x**2  # square\n\n\tprint('hi')\n",
    "emoji 😀👍🏽 and 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "2024-11-27 12:30, price: $1,234.56",
    "I'm sure THEY'LL say it's fine",
    "a\r\nb\n\n\nc   ",
    "",
    "   ",
    "x\u200by\u00a0z",
]


@pytest.fixture(scope="module")
def smollm2_model(smollm2_gguf: Path) -> GGUFModel:
    return read_gguf(smollm2_gguf)


@dataclass
class HFReference:
    """What transformers makes of the SmolLM2 GGUF: its config and its state dict."""

    config: Any
    tensors: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf: Path) -> HFReference:
    """SmolLM2 as transformers loads it from the GGUF (its own dequantize and un-permute).

    `from_pretrained(..., gguf_file=...)` insists on `accelerate`, which parrot does not depend
    on, so this calls the loader `from_pretrained` uses, `load_gguf_checkpoint`, directly. The
    model it maps names with lives on the meta device: only its parameter names are needed.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)
    assert set(loaded["tensors"]) == set(skeleton.state_dict()) - {"lm_head.weight"}
    return HFReference(config=config, tensors=loaded["tensors"])


@pytest.fixture(scope="module")
def hf_smollm2_tokenizer(smollm2_gguf: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )


@pytest.mark.smollm2
def test_smollm2_config_matches_transformers(
    smollm2_model: GGUFModel, hf_smollm2: HFReference
) -> None:
    config = smollm2_model.hf_config
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert {k: config[k] for k in expected} == expected
    hf = hf_smollm2.config
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    # transformers keeps the float32 widening (9.9999997e-06); we keep the written 1e-05.
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"]
    # The dict is a valid transformers config as it stands.
    rebuilt = type(hf)(**config)
    assert rebuilt.rope_parameters == hf.rope_parameters
    assert rebuilt.head_dim == hf.head_dim and rebuilt.tie_word_embeddings is True


@pytest.mark.smollm2
def test_smollm2_side_configs(smollm2_model: GGUFModel) -> None:
    tok = smollm2_model.tokenizer_config
    assert tok["bos_token"] == "<|im_start|>"
    assert tok["eos_token"] == "<|im_end|>"
    assert tok["add_bos_token"] is False
    assert tok["model_max_length"] == 8192
    assert tok["clean_up_tokenization_spaces"] is False
    assert smollm2_model.generation_config == {"bos_token_id": 1, "eos_token_id": [2]}
    meta = smollm2_model.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert meta["file_type_name"] == "MOSTLY_Q4_1"
    assert smollm2_model.n_tensors == 272


@pytest.mark.smollm2
def test_smollm2_tensors_equal_transformers(
    smollm2_model: GGUFModel, hf_smollm2: HFReference
) -> None:
    """Every tensor, q/k included (the un-permute), equals what transformers loads."""
    reference = hf_smollm2.tensors
    seen = []
    for name, tensor in smollm2_model.tensors():
        expected = reference[name]
        assert tensor.dtype == torch.float32
        assert tensor.shape == expected.shape, name
        if not torch.equal(tensor, expected):  # exact is the rule; say by how much if not
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6, msg=name)
        seen.append(name)
    assert len(seen) == smollm2_model.n_tensors
    assert "lm_head.weight" not in seen  # tied: the file has no output.weight
    assert set(reference) == set(seen)
    assert seen[0] == "model.embed_tokens.weight" and seen[-1] == "model.norm.weight"


@pytest.mark.smollm2
def test_smollm2_tokenizer_matches_transformers(
    smollm2_model: GGUFModel, hf_smollm2_tokenizer: Any
) -> None:
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(smollm2_model.tokenizer_json)
    for text in SMOLLM2_TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == hf_smollm2_tokenizer(text, add_special_tokens=False).input_ids, text
        decoded = ours.decode(ids, skip_special_tokens=False)
        assert decoded == text
        assert decoded == hf_smollm2_tokenizer.decode(ids, skip_special_tokens=False)
    chat = ours.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert chat.ids[0] == 1 and chat.ids[-1] == 2
    assert ours.decode(chat.ids, skip_special_tokens=True) == "user\nhi"
    assert smollm2_model.tokenizer_config["chat_template"] == hf_smollm2_tokenizer.chat_template


@pytest.mark.smollm2
def test_smollm2_digits_split_like_the_original_tokenizer(smollm2_model: GGUFModel) -> None:
    """SmolLM2 ("smollm" pre-tokenizer) splits every digit off before GPT-2 splitting.

    Its original tokenizer.json (and llama.cpp) do Digits(individual) then ByteLevel, so a run of
    spaces before a digit stays one piece ("ĠĠ" = 256). transformers' GGUF tokenizer uses plain
    GPT-2 splitting and gives [81, 216, 216, 33] for "a  1": it differs only there.
    """
    from tokenizers import Tokenizer

    ours = Tokenizer.from_str(smollm2_model.tokenizer_json)
    assert ours.encode("a  1", add_special_tokens=False).ids == [81, 256, 33]
    assert ours.encode("\n\n1", add_special_tokens=False).ids == [1116, 33]
    assert ours.encode("Hello world! 123", add_special_tokens=False).ids == [
        19556, 905, 17, 216, 33, 34, 35,
    ]  # fmt: skip


@pytest.mark.smollm2
def test_smollm2_header_validation_is_fast(smollm2_gguf: Path) -> None:
    start = time.perf_counter()
    validate_gguf_header(smollm2_gguf)
    assert time.perf_counter() - start < 1.0


# ============================================================================================
# Dequantization of every common type
# ============================================================================================

DEQUANT_TYPES = [
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL,
]  # fmt: skip


@pytest.mark.parametrize("qtype", DEQUANT_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf(tmp_path: Path, qtype: Q) -> None:
    # 256-wide rows: the K-quant block size.
    spec = TinySpec(hidden=256, n_heads=4, n_kv_heads=2, ffn=256, n_layers=1, weight_type=qtype)
    path = tmp_path / f"{qtype.name}.gguf"
    write_tiny_gguf(path, spec)
    model = read_gguf(path)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for gguf_name in ("token_embd.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight"):
        tensor = by_name[gguf_name]
        assert tensor.tensor_type == qtype
        shape = tuple(reversed(tensor.shape.tolist()))
        expected = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        ours = dequantize_tensor(tensor)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
        np.testing.assert_array_equal(ours.numpy(), expected.reshape(shape))
    ours_by_name = dict(model.tensors())
    v = dequantize_tensor(by_name["blk.0.attn_v.weight"])
    torch.testing.assert_close(ours_by_name["model.layers.0.self_attn.v_proj.weight"], v)
    assert ours_by_name["model.layers.0.self_attn.q_proj.weight"].shape == (256, 256)
    assert ours_by_name["model.layers.0.self_attn.k_proj.weight"].shape == (128, 256)


def test_dequantized_f32_is_a_writable_copy(tiny_path: Path) -> None:
    reader = gguf.GGUFReader(tiny_path)
    tensor = dequantize_tensor(reader.tensors[0])
    tensor.add_(1.0)  # must not touch (or fail on) the read-only memory map
    assert not np.shares_memory(tensor.numpy(), reader.tensors[0].data)


def test_unsupported_tensor_type_names_the_type(tmp_path: Path) -> None:
    path = tmp_path / "q8_1.gguf"
    spec = TinySpec(weight_type=Q.Q8_1)
    write_tiny_gguf(path, spec)
    model = read_gguf(path)  # the header is valid; only decoding the weights is impossible
    with pytest.raises(CheckpointError, match="Q8_1"):
        list(model.tensors())


def test_qk_rows_are_unpermuted_to_hf_layout(tmp_path: Path) -> None:
    """Write HF-layout q/k through llama.cpp's permutation; reading must give them back."""
    rng = np.random.default_rng(1)
    spec = TinySpec(n_layers=1)
    q_hf = rng.standard_normal((spec.n_heads * spec.head_dim, spec.hidden)).astype(np.float32)
    k_hf = rng.standard_normal((spec.n_kv_heads * spec.head_dim, spec.hidden)).astype(np.float32)
    spec.extra_tensors = {
        "blk.0.attn_q.weight": llama_permute(q_hf, spec.n_heads),
        "blk.0.attn_k.weight": llama_permute(k_hf, spec.n_kv_heads),
    }
    path = tmp_path / "perm.gguf"
    written = write_tiny_gguf(path, spec)
    tensors = dict(read_gguf(path).tensors())
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.q_proj.weight"].numpy(), q_hf)
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.k_proj.weight"].numpy(), k_hf)
    # Tensors without RoPE are passed through untouched.
    v = written["blk.0.attn_v.weight"]
    np.testing.assert_array_equal(tensors["model.layers.0.self_attn.v_proj.weight"].numpy(), v)


# ============================================================================================
# Config, tokenizer and naming on tiny files
# ============================================================================================


def test_tiny_model_config_and_tokenizer(tiny_path: Path) -> None:
    from tokenizers import Tokenizer

    model = read_gguf(tiny_path)
    config = model.hf_config
    assert config["hidden_size"] == 64 and config["head_dim"] == 16
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == len(TOKENS)
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is True
    assert model.tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert model.generation_config == {"bos_token_id": 1, "eos_token_id": [2]}

    tok = Tokenizer.from_str(model.tokenizer_json)
    the = TOKENS.index("Ġthe")
    assert tok.encode("<|im_start|> the<think>", add_special_tokens=False).ids == [
        1, the, TOKENS.index("<think>"),
    ]  # fmt: skip
    ids = tok.encode("<|im_start|>x<think>", add_special_tokens=False).ids
    # CONTROL tokens are skippable specials; USER_DEFINED ones are ordinary text on decode.
    assert tok.decode(ids, skip_special_tokens=True) == "x<think>"


def test_add_bos_token_becomes_a_post_processor(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = tmp_path / "bos.gguf"
    write_tiny_gguf(path, TinySpec(add_bos=True))
    model = read_gguf(path)
    assert model.tokenizer_config["add_bos_token"] is True
    tok = Tokenizer.from_str(model.tokenizer_json)
    the = TOKENS.index("Ġthe")
    assert tok.encode(" the").ids == [1, the]
    assert tok.encode(" the", add_special_tokens=False).ids == [the]


def test_names_order_and_untied_head(tmp_path: Path) -> None:
    path = tmp_path / "untied.gguf"
    write_tiny_gguf(path, TinySpec(with_output=True, n_layers=2))
    model = read_gguf(path)
    names = [name for name, _ in model.tensors()]
    assert model.hf_config["tie_word_embeddings"] is False
    assert len(names) == model.n_tensors == 2 + 1 + 2 * 9
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert names[1:10] == [
        f"model.layers.0.{suffix}"
        for suffix in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        )
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        (
            {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
            {"rope_type": "linear", "factor": 4.0},
        ),
        (
            {
                "llama.rope.scaling.type": "yarn",
                "llama.rope.scaling.factor": 2.0,
                "llama.rope.scaling.original_context_length": 128,
            },
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128},
        ),
    ],
)
def test_rope_scaling(tmp_path: Path, extra: dict[str, Any], expected: Any) -> None:
    path = tmp_path / "rope.gguf"
    write_tiny_gguf(path, TinySpec(extra_kv=extra))
    assert read_gguf(path).hf_config["rope_scaling"] == expected


def test_eot_token_joins_eos_list(tmp_path: Path) -> None:
    path = tmp_path / "eot.gguf"
    write_tiny_gguf(path, TinySpec(extra_kv={"tokenizer.ggml.eot_token_id": 0}))
    assert read_gguf(path).generation_config["eos_token_id"] == [2, 0]


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt2", None])
def test_other_pre_tokenizers_build(tmp_path: Path, pre: str | None) -> None:
    from tokenizers import Tokenizer

    path = tmp_path / "pre.gguf"
    write_tiny_gguf(path, TinySpec(pre=pre))
    tok = Tokenizer.from_str(read_gguf(path).tokenizer_json)
    text = "the  12345 thin\n\n x"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_unknown_pre_tokenizer_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "pre.gguf"
    write_tiny_gguf(path, TinySpec(pre="made-up"))
    with pytest.raises(UnsupportedArchitectureError, match="made-up"):
        read_gguf(path)


# ============================================================================================
# Unsupported models
# ============================================================================================


def test_falcon_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    write_tiny_gguf(path, TinySpec(arch="falcon"))
    with pytest.raises(UnsupportedArchitectureError, match="'falcon'.*'llama' GGUF files"):
        read_gguf(path)


def test_sentencepiece_vocabulary_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    write_tiny_gguf(path, TinySpec(tokenizer_model="llama"))
    with pytest.raises(UnsupportedArchitectureError, match="SentencePiece-vocabulary"):
        read_gguf(path)


def test_rope_freqs_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "llama31.gguf"
    freqs = np.ones(8, dtype=np.float32)
    write_tiny_gguf(path, TinySpec(extra_tensors={"rope_freqs.weight": freqs}))
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        read_gguf(path)


def test_missing_tensor_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, TinySpec(skip_tensors=("blk.1.ffn_up.weight",)))
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        read_gguf(path)


def test_shape_mismatch_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "shape.gguf"
    wrong = np.zeros((8, 64), dtype=np.float32)
    write_tiny_gguf(path, TinySpec(extra_tensors={"blk.0.attn_k.weight": wrong}))
    with pytest.raises(CheckpointError, match="blk.0.attn_k.weight"):
        read_gguf(path)


# ============================================================================================
# Untrusted input
# ============================================================================================


def gguf_string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def crafted(n_tensors: int, kvs: list[bytes], tail: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs) + tail


ARCH_KEY = gguf_string(b"general.architecture")
CRAFTED: dict[str, bytes] = {
    "bad magic": b"GGUG" + bytes(60),
    "version 99": crafted(0, [], version=99),
    "version 1": crafted(0, [], version=1),
    "big endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
    "tiny file": b"GGUF\x03\x00",
    "empty file": b"",
    "huge string length": crafted(0, [ARCH_KEY + struct.pack("<IQ", 8, 2**60)]),
    "string past the end": crafted(0, [ARCH_KEY + struct.pack("<IQ", 8, 1000) + b"llama"]),
    "huge key length": crafted(0, [struct.pack("<Q", 2**63) + b"k"]),
    "huge numeric array": crafted(0, [ARCH_KEY + struct.pack("<IIQ", 9, 4, 2**40)]),
    "numeric array past the end": crafted(0, [ARCH_KEY + struct.pack("<IIQ", 9, 4, 1000)]),
    "huge string array": crafted(0, [ARCH_KEY + struct.pack("<IIQ", 9, 8, 10**12)]),
    "string array past the end": crafted(0, [ARCH_KEY + struct.pack("<IIQ", 9, 8, 10**6)]),
    # Valid, but gguf.GGUFReader would spend minutes and gigabytes on its 5M elements.
    "too many array elements": crafted(
        0, [ARCH_KEY + struct.pack("<IIQ", 9, 0, 5 * 10**6) + bytes(5 * 10**6)]
    ),
    "nested array": crafted(0, [ARCH_KEY + struct.pack("<IIQ", 9, 9, 1)], tail=bytes(64)),
    "unknown value type": crafted(0, [ARCH_KEY + struct.pack("<I", 77) + bytes(16)]),
    "huge tensor count": crafted(2**40, []),
    "tensor count past the end": crafted(900_000, [], tail=bytes(1000)),
    "huge kv count": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**50),
    "five dims": crafted(1, [], tail=gguf_string(b"t") + struct.pack("<I", 5) + bytes(64)),
    "zero dim": crafted(
        1, [], tail=gguf_string(b"t") + struct.pack("<IQIQ", 1, 0, 0, 0) + bytes(64)
    ),
    "overflowing dims": crafted(
        1, [], tail=gguf_string(b"t") + struct.pack("<IQQQIQ", 3, 2**40, 2**40, 2**40, 0, 0)
    ),
    "unknown tensor type": crafted(
        1, [], tail=gguf_string(b"t") + struct.pack("<IQIQ", 1, 32, 99, 0) + bytes(64)
    ),
    "tensor data past the end": crafted(
        1, [], tail=gguf_string(b"t") + struct.pack("<IQIQ", 1, 1024, 0, 0) + bytes(64)
    ),
    "misaligned tensor offset": crafted(
        1, [], tail=gguf_string(b"t") + struct.pack("<IQIQ", 1, 4, 0, 3) + bytes(64)
    ),
    "bad alignment": crafted(0, [gguf_string(b"general.alignment") + struct.pack("<II", 4, 3)]),
    "invalid utf-8 key": crafted(0, [gguf_string(b"\xff\xfe") + struct.pack("<IB", 0, 1)]),
    "duplicate key": crafted(0, [gguf_string(b"k") + struct.pack("<IB", 0, 1)] * 2),
}


@pytest.fixture
def no_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a rejected header ever reaches gguf.GGUFReader."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("GGUFReader was called for a header that should have been rejected")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)


@pytest.mark.parametrize("case", sorted(CRAFTED), ids=lambda c: c.replace(" ", "-"))
def test_crafted_headers_are_rejected_quickly(tmp_path: Path, no_reader: None, case: str) -> None:
    path = tmp_path / "crafted.gguf"
    path.write_bytes(CRAFTED[case])
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as caught:
        read_gguf(path)
    assert time.perf_counter() - start < 2.0
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_truncated_copies(tmp_path: Path, tiny_path: Path, no_reader: None) -> None:
    data = tiny_path.read_bytes()
    end = header_end_without_reader(tiny_path)
    cut_header = tmp_path / "cut_header.gguf"
    cut_header.write_bytes(data[: end // 2])
    with pytest.raises(CheckpointError, match="is truncated"):
        read_gguf(cut_header)
    cut_data = tmp_path / "cut_data.gguf"
    cut_data.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"is truncated: tensor \S+ needs 100 bytes past"):
        read_gguf(cut_data)


def header_end_without_reader(path: Path) -> int:
    """The tiny file's header size, found without GGUFReader (which the test has disabled)."""
    data = path.read_bytes()
    # The tensor data of the tiny file starts at the first 32-byte boundary after the last
    # tensor info; the last tensor info ends with its 8-byte offset. Search the last name.
    last = b"blk.1.ffn_down.weight"
    pos = data.rindex(last) + len(last)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    pos += 4 + 8 * n_dims + 4 + 8
    return -(-pos // 32) * 32


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="Cannot read"):
        read_gguf(tmp_path / "nope.gguf")


def test_reader_failures_are_wrapped(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(gguf, "GGUFReader", explode)
    with pytest.raises(CheckpointError, match="not a valid GGUF file") as caught:
        read_gguf(tiny_path)
    assert isinstance(caught.value.__cause__, IndexError)


def test_fuzzed_headers_fail_cleanly(tmp_path: Path, tiny_path: Path) -> None:
    """Flip random header bytes: the result is a model or one of our two errors, nothing else."""
    from tokenizers import Tokenizer

    data = tiny_path.read_bytes()
    end = header_end(tiny_path)
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    deadline = time.monotonic() + 30.0
    iterations = 0
    for iteration in range(200):
        if time.monotonic() > deadline:
            break
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(end)] ^= rng.randint(1, 255)
        path = tmp_path / f"fuzz{iteration}.gguf"
        path.write_bytes(bytes(mutated))
        outcome = _read_everything(path, Tokenizer.from_str)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        path.unlink()
        iterations += 1
    assert iterations >= 50, outcomes
    assert outcomes.get("CheckpointError", 0) > 0, outcomes


def _read_everything(path: Path, load_tokenizer: Callable[[str], Any]) -> str:
    try:
        model = read_gguf(path)
        load_tokenizer(model.tokenizer_json)
        for _ in model.tensors():
            pass
    except (CheckpointError, UnsupportedArchitectureError) as err:
        assert str(err) and "\n" not in str(err)
        return type(err).__name__
    return "ok"


def test_validator_limits_are_generous_enough_for_real_vocabularies(tmp_path: Path) -> None:
    """A 260k-token vocabulary (Gemma-sized) passes and is walked quickly."""
    tokens = [f"tok{i}" for i in range(260_000)]
    path = tmp_path / "big_vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens)
    writer.add_tensor("t", np.zeros(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    start = time.perf_counter()
    validate_gguf_header(path)
    assert time.perf_counter() - start < 1.0
