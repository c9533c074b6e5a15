"""Random-weight llama GGUF files quantized by llama.cpp's own quantizer.

`gguf`'s Python package can write F16 files and a few simple block types, but not the
K-quants, and only llama.cpp's quantizer makes the per-tensor choices real files carry
(a Q4_K_M file keeps attn_v and ffn_down in Q6_K in some layers; Q4_0/Q4_1 files keep the
output head in Q6_K). So this script writes an F16 GGUF with `gguf.GGUFWriter` (tensor by
tensor, so a 1.7B model never sits in memory) and has `llama_cpp.llama_model_quantize`
make each type from it.

It needs llama-cpp-python, which CI does not have: the small files it makes are committed
in tests/data/gguf/ (the test fixtures), and the benchmark's big model is made on demand.

    # the committed test fixtures (tiny random llama, generated BPE vocabulary):
    /work/wt/llamacpp-venv/bin/python tests/data/make_gguf_fixtures.py
    # the benchmark model (SmolLM2-1.7B's shape, tokenizer copied from the SmolLM2 GGUF):
    /work/wt/llamacpp-venv/bin/python tests/data/make_gguf_fixtures.py --shape smollm2-1.7b \\
        --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/bench-gguf
"""

from __future__ import annotations

import argparse
import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gpt2_bytes import gpt2_byte_alphabet  # beside this script (its folder is on sys.path)

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's
    tied: bool
    context: int = 2048


SHAPES = {
    # Rows of 256 so every tensor can take K-quants; two layers so Q4_K_M shows both its
    # choices (llama.cpp gives the last layer's attn_v/ffn_down more bits); an untied Q6_K
    # head; 320 tokens, a multiple of 16 (int4 packing) and of 32.
    "tiny": Shape("tiny-llama", 256, 2, 4, 1, 256, 320, tied=False, context=256),
    "smollm2-1.7b": Shape("smollm2-1.7b-random", 2048, 24, 32, 32, 8192, None, tied=True, context=8192),
}
FTYPES = {
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
}


# --------------------------------------------------------------------------- tokenizer


def tiny_vocab(size: int) -> dict:
    """Specials, the byte alphabet, then merges of frequent English pairs up to `size`."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *gpt2_byte_alphabet()]
    merges: list[str] = []

    def merge(a: str, b: str) -> None:
        if len(tokens) < size and a + b not in tokens:
            merges.append(f"{a} {b}")
            tokens.append(a + b)

    for letter in "abcdefghijklmnopqrstuvwxyz":
        merge("Ġ", letter)
    for pair in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "or", "es", "is",
                 "it", "al", "ou", "ed", "ha", "to", "st", "ar", "ng", "le", "of", "me"):
        merge(pair[0], pair[1])
    for a, b in (("Ġt", "h"), ("Ġth", "e"), ("Ġa", "n"), ("Ġan", "d"), ("Ġi", "n"), ("Ġo", "f"),
                 ("Ġt", "o"), ("Ġi", "s"), ("Ġi", "t"), ("i", "ng"), ("Ġw", "a"), ("Ġb", "e")):
        merge(a, b)
    if len(tokens) != size:
        raise SystemExit(f"the generated vocabulary has {len(tokens)} tokens, not {size}")
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokens": tokens,
        "types": types, "merges": merges, "bos": 1, "eos": 2,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }


def copied_vocab(path: Path) -> dict:
    """The tokenizer keys of an existing GGUF (the SmolLM2 file)."""
    reader = gguf.GGUFReader(path)

    def value(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return {
        "tokenizer.ggml.model": value("tokenizer.ggml.model"), "tokenizer.ggml.pre": value("tokenizer.ggml.pre"),
        "tokens": value("tokenizer.ggml.tokens"), "types": value("tokenizer.ggml.token_type"),
        "merges": value("tokenizer.ggml.merges"), "bos": value("tokenizer.ggml.bos_token_id"),
        "eos": value("tokenizer.ggml.eos_token_id"), "chat_template": value("tokenizer.chat_template"),
    }


# --------------------------------------------------------------------------- the F16 file


def tensor_specs(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, ...], float]]:
    """(GGUF name, numpy shape [rows, cols], std) in llama.cpp's order. Weights have std
    1/sqrt(inputs) so activations keep their size through the random layers; the head
    2/sqrt(hidden) so logits spread (std ~2) and greedy choices are not coin flips."""
    h, head_dim = shape.hidden, shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    out = [("token_embd.weight", (vocab, h), 2 / h**0.5)]
    for i in range(shape.layers):
        out += [
            (f"blk.{i}.attn_norm.weight", (h,), 0.0),
            (f"blk.{i}.attn_q.weight", (h, h), h**-0.5),
            (f"blk.{i}.attn_k.weight", (kv, h), h**-0.5),
            (f"blk.{i}.attn_v.weight", (kv, h), h**-0.5),
            (f"blk.{i}.attn_output.weight", (h, h), h**-0.5),
            (f"blk.{i}.ffn_norm.weight", (h,), 0.0),
            (f"blk.{i}.ffn_gate.weight", (shape.intermediate, h), h**-0.5),
            (f"blk.{i}.ffn_up.weight", (shape.intermediate, h), h**-0.5),
            (f"blk.{i}.ffn_down.weight", (h, shape.intermediate), shape.intermediate**-0.5),
        ]
    out.append(("output_norm.weight", (h,), 0.0))
    if not shape.tied:
        out.append(("output.weight", (vocab, h), 2 / h**0.5))
    return out


def write_f16(path: Path, shape: Shape, vocab: dict, seed: int = 0) -> None:
    n_vocab = shape.vocab or len(vocab["tokens"])
    if n_vocab != len(vocab["tokens"]):
        raise SystemExit(f"{shape.name} needs {n_vocab} tokens, the tokenizer has {len(vocab['tokens'])}")
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", shape.name)
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_uint32("llama.block_count", shape.layers)
    w.add_uint32("llama.context_length", shape.context)
    w.add_uint32("llama.embedding_length", shape.hidden)
    w.add_uint32("llama.feed_forward_length", shape.intermediate)
    w.add_uint32("llama.attention.head_count", shape.heads)
    w.add_uint32("llama.attention.head_count_kv", shape.kv_heads)
    w.add_float32("llama.rope.freq_base", 100000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.rope.dimension_count", shape.hidden // shape.heads)
    w.add_uint32("llama.vocab_size", n_vocab)
    w.add_tokenizer_model(vocab["tokenizer.ggml.model"])
    w.add_tokenizer_pre(vocab["tokenizer.ggml.pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(False)
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])
    specs = tensor_specs(shape, n_vocab)
    for name, dims, _ in specs:
        dtype = np.float32 if len(dims) == 1 else np.float16
        w.add_tensor_info(name, dims, np.dtype(dtype), int(np.prod(dims)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, dims, std in specs:
        if len(dims) == 1:  # norms: around 1, as trained models have them
            w.write_tensor_data((1 + 0.1 * rng.standard_normal(dims)).astype(np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(dims, dtype=np.float32) * std).astype(np.float16))
    w.close()


def quantize(src: Path, dst: Path, ftype: str, threads: int = 2) -> float:
    """llama.cpp's quantizer, F16 -> `ftype`; returns the seconds it took."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {ftype}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", type=Path, default=HERE / "gguf")
    parser.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K_M")
    parser.add_argument("--tokenizer-from", type=Path, help="copy the tokenizer of this GGUF (default: a generated one)")
    parser.add_argument("--keep-f16", action="store_true", help="keep the F16 file next to the quantized ones")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    vocab = copied_vocab(args.tokenizer_from) if args.tokenizer_from else tiny_vocab(shape.vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"{shape.name}-F16.gguf"
    start = time.perf_counter()
    write_f16(f16, shape, vocab)
    print(f"{f16}: {f16.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
    for ftype in args.types.split(","):
        dst = args.out / f"{shape.name}-{ftype}.gguf"
        seconds = quantize(f16, dst, ftype)
        print(f"{dst}: {dst.stat().st_size / 1e6:.2f} MB in {seconds:.1f} s")
    if not args.keep_f16:
        f16.unlink()


if __name__ == "__main__":
    main()
