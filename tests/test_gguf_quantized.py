"""GGUF imports that stay quantized (`checkpoint/gguf_quant.py`).

Every mapping is checked against `gguf`'s own dequantization: the exact types (Q4_0, Q4_1,
Q4_K) bit for bit with fp32 scales and within the bf16 rounding bound as stored; the
others against the error of the mode they land in. Then real files made by llama.cpp's
quantizer (tests/data/gguf/, written by tests/data/make_gguf_fixtures.py: a tiny random
llama in Q4_0, Q4_1, Q8_0 and Q4_K_M) and the real SmolLM2 Q4_1 file are imported and
compared with their float-dequantized imports."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from parrot_cli import LLM
from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.gguf import _unpermute_rope_rows
from parrot_cli.checkpoint.gguf_quant import GGUFPart, GGUFWeight, exact_int4, plan_mode, store
from parrot_cli.checkpoint.info import read_info, weight_files
from parrot_cli.checkpoint.store import load_weights
from parrot_cli.quantize.format import QuantizedWeight
from parrot_cli.quantize.qconfig import read_quantization_config
from parrot_cli.quantize.weight_only import QuantizedEmbedding
from tests.test_gguf import F16_FIELDS

FIXTURES = Path(__file__).parent / "data" / "gguf"
TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()
BF16_ROUNDING = 2.0**-8  # unit roundoff of bf16 (8 significant bits, rounded to nearest)


def blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw bytes uint8 [rows, bytes per row] of a (rows, cols) tensor in `qtype`: gguf's own
    quantizer where it has one, else random bytes with sane fp16 scales (K-quants)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        return gguf.quants.quantize(values, qtype)
    except NotImplementedError:
        pass
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(rows, cols // block, len(F16_FIELDS[qtype]))).astype(np.float16)
    for i, offset in enumerate(F16_FIELDS[qtype]):
        raw[..., offset : offset + 2] = scales[..., i : i + 1].view(np.uint8)
    return raw.reshape(rows, -1)


def part(qtype: Q, rows: int, cols: int, seed: int = 0, heads: int = 0, name: str = "w") -> GGUFPart:
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        raw = np.random.default_rng(seed).standard_normal((rows, cols)).astype(dtype)
    elif qtype == Q.BF16:
        raw = gguf.quants.quantize(np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32), Q.BF16)
    else:
        raw = blocks(qtype, rows, cols, seed)
    return GGUFPart(name, qtype, raw, (rows, cols), heads)


def assert_within_mode(qw: QuantizedWeight, how: str, ref: torch.Tensor) -> None:
    """The stored weight against the float values it stands for: an exact mapping moves a
    weight by at most the bf16 rounding of its group's scale (times |q - 8| <= 8) plus
    that of its zero; int8 per channel by half a step (absmax / 254); int4 round to
    nearest by one step of its group's range."""
    n, k = ref.shape
    error = (qw.dequantize() - ref).abs()
    if how == "exact":
        g = qw.group_size
        bound = BF16_ROUNDING * (8 * qw.scales.float().abs() + qw.tinygemm_zeros().abs()) * 1.01 + 1e-7
        worst = (error.reshape(n, k // g, g) / bound[..., None]).max()
    elif qw.bits == 8:
        worst = (error / (ref.abs().amax(dim=1, keepdim=True) / 254 * 1.01 + 1e-7)).max()
    else:
        groups = ref.reshape(n, k // 32, 32)
        step = (groups.amax(-1) - groups.amin(-1))[..., None] / 15
        worst = (error.reshape(n, k // 32, 32) / (step * 1.01 + 1e-7)).max()
    assert float(worst) <= 1, (how, qw.describe(), float(worst))


def reference(p: GGUFPart) -> torch.Tensor:
    """gguf's dequantization of a part, in HF row order."""
    values = torch.from_numpy(np.array(gguf.quants.dequantize(p.raw, p.qtype), dtype=np.float32)).reshape(p.shape)
    return _unpermute_rope_rows(values, p.unpermute_heads) if p.unpermute_heads else values


# --------------------------------------------------------------------------- mappings


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_exact_types_keep_their_codes_and_round_only_the_scales(qtype):
    raw = blocks(qtype, 32, 512)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).float()
    # With fp32 scales the int4 layout reproduces the file's values (to fp32 rounding).
    exact = exact_int4(raw, qtype, 512, scale_dtype=torch.float32)
    torch.testing.assert_close(exact.dequantize(), ref, rtol=1e-6, atol=1e-6)
    # As stored (bf16 scales and zeros): only the rounding of the scales and zeros moves
    # the weights, and it is real (measured, not assumed away).
    stored = exact_int4(raw, qtype, 512)
    assert stored.scales.dtype == torch.bfloat16 and stored.group_size == 32
    assert torch.equal(stored.data, exact.data)
    assert_within_mode(stored, "exact", ref)
    assert float((stored.dequantize() - ref).abs().max()) > 0
    if qtype == Q.Q4_0:  # w = d * (q - 8): the integer zero 8, one byte a group
        assert stored.zero_kind == "int" and bool((stored.qzeros == 8).all())


@pytest.mark.parametrize(
    "qtype, mode",
    [(Q.Q8_0, "int8"), (Q.Q5_0, "int8"), (Q.Q5_1, "int8"), (Q.Q5_K, "int8"), (Q.Q6_K, "int8"),
     (Q.Q2_K, "int4"), (Q.Q3_K, "int4"), (Q.IQ4_NL, "int4")],
)
def test_inexact_types_are_requantized_to_the_nearest_mode(qtype, mode):
    p = part(qtype, 32, 256)
    stored = store(GGUFWeight((p,)))
    qw = stored.quantized
    assert f"int{qw.bits}" == mode and stored.meta["how"] == "requantized" and stored.meta["from"] == qtype.name
    assert qw.groups == 1 if mode == "int8" else qw.group_size == 32
    assert_within_mode(qw, "requantized", reference(p))


@pytest.mark.parametrize("qtype, dtype", [(Q.F16, torch.float16), (Q.BF16, torch.bfloat16), (Q.F32, torch.float32)])
def test_float_types_keep_their_dtype(qtype, dtype):
    p = part(qtype, 16, 64)
    stored = store(GGUFWeight((p,)))
    assert stored.quantized is None and stored.tensor.dtype == dtype
    torch.testing.assert_close(stored.tensor.float(), reference(p), rtol=0, atol=0)


def test_a_fused_module_has_one_mode():
    q, k, v = part(Q.Q4_K, 64, 256, 1), part(Q.Q4_K, 32, 256, 2), part(Q.Q6_K, 32, 256, 3)
    fused = GGUFWeight.cat_rows([GGUFWeight((x,)) for x in (q, k, v)])
    assert plan_mode(fused) == "int8"
    stored = store(fused)
    assert stored.meta["how"] == "promoted" and stored.meta["from"] == "Q4_K+Q6_K"
    assert_within_mode(stored.quantized, "promoted", torch.cat([reference(x) for x in (q, k, v)]))
    # Exact 4-bit parts with different zero kinds fuse as float zeros, still exact.
    a, b = part(Q.Q4_0, 32, 256, 4), part(Q.Q4_1, 32, 256, 5)
    mixed = store(GGUFWeight.cat_rows([GGUFWeight((a,)), GGUFWeight((b,))]))
    assert mixed.quantized.zero_kind == "float" and mixed.meta["how"] == "exact"
    assert_within_mode(mixed.quantized, "exact", torch.cat([reference(a), reference(b)]))
    # Rows the int4 kernel cannot pack (not a multiple of 16) go to int8.
    assert plan_mode(GGUFWeight((part(Q.Q4_0, 24, 256),))) == "int8"


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_rope_permutation_is_undone_on_codes_and_scales(qtype):
    p = part(qtype, 64, 256, heads=2)  # two heads of 32 rows
    stored = store(GGUFWeight((p,)))
    ref = reference(p)
    assert not torch.allclose(torch.from_numpy(np.array(gguf.quants.dequantize(p.raw, qtype))).reshape(64, 256), ref)
    assert_within_mode(stored.quantized, stored.meta["how"], ref)


# --------------------------------------------------------------------------- llama.cpp files


def fixture(kind: str) -> Path:
    return FIXTURES / f"tiny-llama-{kind}.gguf"


def test_fixtures_are_small_and_were_made_by_llama_cpp():
    files = sorted(FIXTURES.glob("*.gguf"))
    assert [f.name for f in files] == [f"tiny-llama-{k}.gguf" for k in ("Q4_0", "Q4_1", "Q4_K_M", "Q8_0")]
    assert sum(f.stat().st_size for f in files) < 3 * 1024**2
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(fixture("Q4_K_M")).tensors}
    # llama.cpp's own choices: more bits for the last layer's attn_v / ffn_down and the head.
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["output.weight"] == "Q6_K"


EXPECTED_MAPPING = {
    "Q4_0": ("int4", ["Q4_0 -> int4 g32 x9 (exact up to bf16 scale rounding)", "Q6_K -> int8 x1 (re-quantized)"]),
    "Q4_1": ("int4", ["Q4_1 -> int4 g32 x9 (exact up to bf16 scale rounding)", "Q6_K -> int8 x1 (re-quantized)"]),
    "Q8_0": ("int8", ["Q8_0 -> int8 x10 (re-quantized)"]),
    "Q4_K_M": ("mixed", [
        "Q4_K -> int4 g32 x7 (exact up to bf16 scale rounding)",
        "Q6_K -> int8 x2 (re-quantized)",
        "Q4_K+Q6_K -> int8 x1 (re-quantized to int8: its fused parts have different types)",
    ]),
}


@pytest.fixture(scope="module")
def imports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each fixture imported twice: kept quantized (the default) and dequantized (float32)."""
    root = tmp_path_factory.mktemp("gguf-imports")
    return {
        kind: (convert(fixture(kind), root / kind), convert(fixture(kind), root / f"{kind}-f32", dtype="float32"))
        for kind in EXPECTED_MAPPING
    }


@pytest.mark.parametrize("kind", list(EXPECTED_MAPPING))
def test_llama_cpp_file_imports_quantized(kind, imports):
    quantized, dequantized = imports[kind]
    stored = read_quantization_config(quantized)
    mode, mapping = EXPECTED_MAPPING[kind]
    assert (stored.mode, stored.method, stored.mapping()) == (mode, "gguf", mapping)
    assert read_info(quantized).provenance["dequantized"] is False
    assert read_quantization_config(dequantized) is None
    size = sum(f.stat().st_size for f in weight_files(quantized))
    assert size <= 1.2 * fixture(kind).stat().st_size
    # Every stored module against the float import's weight, within its mapping's error.
    q_state, f_state = load_weights(quantized), load_weights(dequantized)
    for module, meta in stored.modules.items():
        qw = QuantizedWeight.from_tensors(module, q_state, meta)
        qw.check_values(module)
        assert_within_mode(qw, meta["how"], f_state[module + ".weight"])
    if kind == "Q4_K_M":
        assert stored.modules["transformer.h.0.attn.qkv"]["bits"] == 4
        assert stored.modules["transformer.h.1.attn.qkv"]["how"] == "promoted"
    # Logits: the quantized import runs on the int4/int8 kernels (bf16 activations); the
    # float import in fp32 is the reference, and the same float model computing in bf16
    # shows how much of the difference bf16 activations alone explain.
    q_llm = LLM.load(quantized, device="cpu", precision="32-true")
    f_llm = LLM.load(dequantized, device="cpu", precision="32-true")
    b_llm = LLM.load(dequantized, device="cpu", precision="bf16-true")
    ids = q_llm.tokenizer.encode("the cat and the dog went to the park in the morning, and then it rained")
    got, want, bf16 = q_llm.logits(ids), f_llm.logits(ids), b_llm.logits(ids)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= max(3 * float((bf16 - want).abs().max()), 0.02 * scale)
    assert isinstance(q_llm.model.transformer.wte, QuantizedEmbedding)
    assert q_llm.weight_bytes() < 0.6 * f_llm.weight_bytes() / 2  # well under the bf16 size


def test_int8_on_an_int4_import_is_a_usage_error(imports):
    from tests.conftest import run_parrot
    from tests.test_cli import assert_one_line_error

    result = run_parrot("generate", "the", "--checkpoint-dir", str(imports["Q4_0"][0]), "--quantize", "int8",
                        "--max-new-tokens", "2")
    assert_one_line_error(result, 2, "already holds int4", "--quantize int8 needs a float checkpoint", "Q4_0.gguf")


def test_a_tied_q4_0_model_keeps_one_table_for_embedding_and_head(tmp_path):
    """A tied model written by gguf-py, every weight Q4_0: 264 vocabulary rows do not pack
    for the int4 kernel, so the table becomes int8 and the head runs on its codes."""
    from tests.test_gguf import TinySpec, write_tiny_gguf

    path = tmp_path / "tied.gguf"
    write_tiny_gguf(path, TinySpec(weight_type=Q.Q4_0, hidden=64, ffn=128))
    quantized = convert(path, tmp_path / "q")
    stored = read_quantization_config(quantized)
    assert stored.modules["transformer.wte"]["how"] == "shape"
    assert stored.modules["transformer.h.0.mlp.fc"] == {"bits": 4, "group_size": 32, "zero": "int",
                                                       "from": "Q4_0", "how": "exact"}
    llm = LLM.load(quantized, device="cpu", precision="32-true")
    assert llm.model.lm_head.tied_embedding and llm.model.lm_head.nbytes == 0  # shares the codes
    floats = LLM.load(convert(path, tmp_path / "f", dtype="float32"), device="cpu", precision="32-true")
    ids = [5, 60, 70, 80, 90]
    want = floats.logits(ids)
    torch.testing.assert_close(llm.logits(ids), want, atol=0.05 * float(want.abs().max()), rtol=0)


def test_an_int4_table_serves_a_tied_head_on_the_kernel():
    """Q4_x token embeddings stay int4 g32; a tied head packs those codes for the kernel."""
    qw = exact_int4(blocks(Q.Q4_1, 320, 64), Q.Q4_1, 64)
    table = QuantizedEmbedding(qw, torch.float32)
    idx = torch.tensor([[0, 5, 319]])
    torch.testing.assert_close(table(idx)[0], qw.dequantize()[idx[0]], rtol=0, atol=0)
    head = table.tied_head()
    x = torch.randn(3, 64)
    expected = x.to(torch.bfloat16).float() @ qw.dequantize().T
    torch.testing.assert_close(head(x), expected, atol=0.05, rtol=0.02)


# --------------------------------------------------------------------------- the real SmolLM2


REFERENCE = " Alex, and I'm a professional coach. I've been working with clients for over 10"
# The reference prompt, and two whose greedy paths split between the quantized and the
# float import (both at near-ties of the float model: measured in benchmarks/checkpoints.md).
PROMPTS = ["Hello, my name is", "The capital of France is", "The three most useful things to pack for a hike are"]


@pytest.fixture(scope="module")
def smollm2_q(smollm2_quantized_checkpoint):
    return LLM.load(smollm2_quantized_checkpoint, device="cpu", precision="32-true")


@pytest.mark.smollm2
def test_smollm2_lands_small_and_exact(smollm2_quantized_checkpoint, smollm2_gguf):
    stored = read_quantization_config(smollm2_quantized_checkpoint)
    assert stored.mode == "int4" and stored.mapping() == [
        "Q4_1 -> int4 g32 x120 (exact up to bf16 scale rounding)", "Q8_0 -> int8 x1 (re-quantized)"]
    size = sum(f.stat().st_size for f in smollm2_quantized_checkpoint.iterdir())
    assert size <= 120e6 and size <= 1.2 * smollm2_gguf.stat().st_size
    rounding = stored.details["scale_rounding"]
    assert 0 < rounding["scale_rel_max"] <= BF16_ROUNDING  # fp16 -> bf16 of d (and m + 8d)
    assert rounding["scale_rel_mean"] < rounding["scale_rel_max"]


@pytest.mark.smollm2
def test_smollm2_quantized_import_keeps_perplexity_and_greedy_text(smollm2_q, smollm2_llm):
    assert isinstance(smollm2_q.model.transformer.wte, QuantizedEmbedding)
    assert smollm2_q.model.lm_head.tied_embedding  # the int8 table serves the head too
    assert smollm2_q.weight_bytes() < 100e6
    ratio = smollm2_q.perplexity(TEXT) / smollm2_llm.perplexity(TEXT)
    assert abs(ratio - 1) <= 0.01, ratio
    assert smollm2_q.generate(PROMPTS[0], max_new_tokens=20, temperature=0) == REFERENCE
    for prompt in PROMPTS:
        got = _greedy_ids(smollm2_q, prompt)
        want = _greedy_ids(smollm2_llm, prompt)
        if got == want:
            continue
        # Greedy paths may split only at a near-tie of the float model: its top two logits
        # within two bf16 steps at their size (the int8 head computes in bf16, so its
        # logits, ~37 here, come in steps of 0.25 and cannot order a closer pair).
        split = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        logits = smollm2_llm.logits(smollm2_llm.tokenizer.encode(prompt) + want[:split])[-1]
        top = logits.topk(2).values
        bf16_step = 2.0 ** (math.floor(math.log2(float(top[0].abs()))) - 7)
        assert float(top[0] - top[1]) < 2 * bf16_step, (prompt, split, float(top[0] - top[1]))


def _greedy_ids(llm, prompt: str) -> list[int]:
    stream = llm.stream(prompt, max_new_tokens=28, temperature=0)
    for _ in stream:
        pass
    return stream.result.token_ids


@pytest.mark.smollm2
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_smollm2_import_and_generate_peaks(smollm2_gguf, tmp_path):
    """Converting streams tensor by tensor and loading maps the file: each process grows
    by at most 1.5x the checkpoint (generate: plus its KV cache) over the interpreter with
    torch imported, beyond fixed costs measured here: the GGUF reader's parse of 49152
    token strings (~160 MB, a cost of `gguf.GGUFReader` whatever the weights) and the
    tokenizer plus torch's first-use allocations (PEAK_MARGIN of test_quantize)."""
    code = (
        "import json, sys\n"
        "def status(k): return int(open('/proc/self/status').read().split(k + ':')[1].split()[0]) * 1024\n"
        "import torch, gguf, parrot_cli.api\n"
        "from parrot_cli.checkpoint.convert import convert\n"
        "before = status('VmRSS')\n"
        "if sys.argv[1] == 'convert':\n"
        "    convert(sys.argv[2], sys.argv[3]); extra = 0\n"
        "else:\n"
        "    llm = parrot_cli.api.LLM.load(sys.argv[2], device='cpu')\n"
        "    llm.generate('Hello, my name is', max_new_tokens=8, temperature=0)\n"
        "    extra = llm.cache_bytes(llm.model.cache_length)\n"
        "print(json.dumps({'grown': status('VmHWM') - before, 'cache': extra}))\n"
    )
    target = tmp_path / "ckpt"
    peaks = {}
    for args in (("convert", str(smollm2_gguf), str(target)), ("generate", str(target))):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        peaks[args[0]] = json.loads(out.stdout.strip().splitlines()[-1])
    size = sum(f.stat().st_size for f in weight_files(target))
    reader = 200 * 2**20
    margin = 128 * 2**20
    assert peaks["convert"]["grown"] <= 1.5 * size + reader, (peaks, size)
    assert peaks["generate"]["grown"] <= 1.5 * size + peaks["generate"]["cache"] + margin, (peaks, size)
    assert math.isfinite(size)
