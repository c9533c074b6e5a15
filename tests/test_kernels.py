"""parrot's native CPU kernels (kernels/native.py, kernels/decode.py).

- Every instruction set this CPU runs computes what torch computes (fp64 reference of
  the same weights), and dequantizes bit for bit.
- The int4 / int8 modules give the same results on the native and torch backends.
- Without a C compiler nothing breaks: torch's kernels run and generation is unchanged.
- The fused decode step gives the model's own logits for every family, its rescored head
  gives exactly the top tokens of the float head, and the real SmolLM2 decodes the
  reference text through it.
- A decode step is one native call: no Python-level per-token work crept back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from parrot_cli import LLM
from parrot_cli.checkpoint.convert import convert
from parrot_cli.generation import SamplingParams, generate_tokens
from parrot_cli.kernels import decode, native
from parrot_cli.quantize.format import QuantizedWeight
from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from tests.hf_factory import CASES_BY_ID, build, sample_ids

# The reference continuation of "Hello, my name is" (transformers, fp32; FINDINGS.md).
REFERENCE = " Alex, and I'm a professional coach. I've been working with clients for over 10"


@pytest.fixture(scope="module")
def lib() -> native.Native:
    loaded = native.library()
    assert loaded is not None, f"the native kernels did not build here: {native.unavailable_reason()}"
    return loaded


@contextlib.contextmanager
def isa(lib: native.Native, name: str):
    previous = lib.isa
    lib.select(name)
    try:
        yield
    finally:
        lib.select(previous)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).abs().max() / expected.abs().max())


def int4_cases(gen: torch.Generator) -> list[tuple[str, QuantizedWeight]]:
    """Float and integer zeros, every group shape the kernels take, act-order, odd block
    counts (K = 96, 160), fp16 scales (an imported GPTQ)."""
    cases = []
    for n, k, group in ((37, 576, 32), (16, 2048, 64), (9, 1024, 128), (8, 160, 160), (12, 96, 32), (5, 512, 512)):
        qw = quantize_int4(torch.randn(n, k, generator=gen), group)
        cases.append((f"float zeros g{group} k{k}", qw))
        qzeros = torch.randint(0, 16, qw.scales.shape, generator=gen, dtype=torch.uint8)
        cases.append((f"int zeros g{group} k{k}", QuantizedWeight(4, qw.data, qw.scales.half(), qzeros=qzeros)))
    qw = quantize_int4(torch.randn(24, 256, generator=gen), 64)
    cases.append(("act-order", QuantizedWeight(4, qw.data, qw.scales, qw.zeros, perm=torch.randperm(256, generator=gen))))
    return cases


def test_every_instruction_set_matches_torch(lib):
    gen = torch.Generator().manual_seed(0)
    for name in lib.supported:
        with isa(lib, name):
            for what, qw in int4_cases(gen):
                weight = native.int4_weight(qw.data, qw.scales, qw.zeros, qw.qzeros, perm=qw.perm)
                x = torch.randn(3, qw.in_features, generator=gen)
                expected = x.double() @ qw.dequantize().double().T
                # int16 activations: far inside bf16 rounding (2^-8 relative)
                assert relative_error(native.linear_forward(lib, weight, x), expected) < 2e-4, (name, what)
                stored_order = QuantizedWeight(4, qw.data, qw.scales, qw.zeros, qw.qzeros)
                assert torch.equal(native.dequantize(lib, weight), stored_order.dequantize()), (name, what)
            for n, k in ((37, 576), (5, 100), (64, 2048)):
                w = torch.randn(n, k, generator=gen)
                x = torch.randn(2, k, generator=gen)
                q8 = quantize_int8(w)
                for what, weight, dense in (
                    ("int8", native.int8_weight(q8.data, q8.scales), q8.dequantize()),
                    ("fp32", native.dense_weight(w), w),
                    ("bf16", native.dense_weight(w.bfloat16()), w.bfloat16().float()),
                ):
                    expected = x.double() @ dense.double().T
                    assert relative_error(native.linear_forward(lib, weight, x), expected) < 1e-5, (name, what)


def test_native_and_torch_backends_agree():
    """Decode-sized and prefill-sized inputs (the dense, dequantized-tile path), with a
    bias and an act-order perm, in fp32 and bf16 activations."""
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128) * 0.1, torch.randn(96) * 0.1
    perm = torch.randperm(128)
    qw4 = quantize_int4(weight, 32)
    qw4.perm = perm
    layers = {}
    for backend in ("native", "torch"):
        with contextlib.nullcontext() if backend == "native" else native.turned_off():
            layers[backend] = (Int4Linear.from_quantized(qw4, bias), Int8Linear.from_float(weight, bias))
        assert all(layer.backend == backend for layer in layers[backend])
    references = (qw4.dequantize(), quantize_int8(weight).dequantize())
    for i, deq in enumerate(references):
        for rows, dtype in ((1, torch.float32), (3, torch.bfloat16), (70, torch.float32)):
            x = torch.randn(rows, 128).to(dtype)
            expected = x.double() @ deq.double().T + bias.double()
            for backend in ("native", "torch"):
                y = layers[backend][i](x)
                assert y.dtype == dtype and y.shape == (rows, 96)
                # torch's kernels compute in bf16; native in fp32 (bf16 inputs stay as given)
                assert relative_error(y, expected) < (1e-2 if backend == "torch" or dtype == torch.bfloat16 else 1e-4)


def test_widened_bf16_linear_computes_in_fp32(lib):
    """bf16 weights on a CPU without bf16 arithmetic: decode rows through the bf16 matvec,
    prefill rows through fp32 tiles; both equal the fp32 product of the bf16 weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 80).bfloat16()
    widened = native.WidenedLinear(linear)
    assert native.widen_bf16_linears(torch.nn.Sequential(torch.nn.Linear(4, 4).bfloat16())) == 1
    for rows in (1, 40):
        x = torch.randn(rows, 128).bfloat16()
        expected = x.double() @ linear.weight.double().T + linear.bias.double()
        y = widened(x)
        assert y.dtype == torch.bfloat16
        assert relative_error(y, expected) < 4e-3  # the output rounded to bf16, nothing else


def test_no_compiler_means_torch_kernels(tmp_path, monkeypatch, tiny_checkpoint, lib):
    """CC pointing at a missing binary and an empty cache: no library, a reason, and every
    module and the decode loop on torch's kernels with the same greedy tokens."""
    ids = sample_ids(CASES_BY_ID["llama-gqa-tied"])
    fused = LLM.load(tiny_checkpoint, precision="32-true", device="cpu")
    assert fused.decode_kernel.startswith("native")
    expected = greedy(fused, ids, 10)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PARROT_CACHE", str(tmp_path / "empty-cache"))
    native.reset()
    try:
        assert native.library() is None
        assert "no C compiler" in native.unavailable_reason()
        assert Int4Linear.from_quantized(quantize_int4(torch.randn(32, 64), 32), None).backend == "torch"
        plain = LLM.load(tiny_checkpoint, precision="32-true", device="cpu")
        assert plain.decode_kernel == "torch" and decode.decoder_for(plain.model) is None
        assert greedy(plain, ids, 10) == expected
    finally:
        monkeypatch.undo()
        native.reset()
    assert native.library() is not None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-llama")
    return convert(build(CASES_BY_ID["llama-gqa-tied"], root / "hf"), root / "parrot")


def greedy(llm: LLM, prompt: list[int], n: int) -> list[int]:
    llm.ensure_cache(len(prompt) + n)
    with torch.inference_mode():
        return list(generate_tokens(llm.model, prompt, max_new_tokens=n, params=SamplingParams(temperature=0)))


# Families and variants the fused step must match the forward on: parallel / sequential
# residual, LayerNorm with biases, shared norm, partial rotary, gelu / gelu_tanh / silu,
# MQA / GQA, biases everywhere, head_dim != hidden / heads, sliding window, a
# length-dependent rope past its original context.
FUSED_CASES = ["neox-parallel-rot25", "neox-sequential-rot100", "falcon-7b-mqa", "falcon-40b-newarch-ln2",
               "llama-bias", "llama-headdim24", "llama-rope-longrope", "mistral-gqa-sw8"]


@pytest.mark.parametrize("case_id", FUSED_CASES)
def test_fused_step_gives_the_forward_logits(case_id, tmp_path, lib):
    case = CASES_BY_ID[case_id]
    llm = LLM.load(convert(build(case, tmp_path / "hf"), tmp_path / "parrot"), precision="32-true", device="cpu")
    assert llm.decode_kernel.startswith("native")
    model, ids = llm.model, sample_ids(case, case.test_length())
    prefill = 3
    model.setup_caches(1, len(ids))
    step = decode.decoder_for(model)
    assert step is not None
    with torch.inference_mode():
        model(torch.tensor([ids[:prefill]]), torch.arange(prefill))
        for pos in range(prefill, len(ids)):
            fused = step.step(ids[pos], pos, 0).logits.clone()
            top = step.step(ids[pos], pos, 1)  # the same position again: the same cache row
            reference = model(torch.tensor([[ids[pos]]]), torch.tensor([pos]))[0, -1]
            torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
            if top.top_ids is not None:  # the rescored head: exactly the reference's best
                assert int(top.top_ids[0]) == int(reference.argmax())
    model.clear_caches()


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_checkpoint) -> LLM:
    return LLM.load(smollm2_checkpoint, precision="32-true", device="cpu", quantize="int4", group_size=32)


@pytest.mark.smollm2
def test_real_model_decodes_the_reference_text_fused(smollm2_llm, smollm2_int4):
    """fp32 and int4 g32 (lossless on this Q4_1-derived model) both give the reference."""
    for llm in (smollm2_llm, smollm2_int4):
        assert llm.decode_kernel.startswith("native")
        assert llm.generate("Hello, my name is", max_new_tokens=24, temperature=0).startswith(REFERENCE)


@pytest.mark.smollm2
def test_rescored_head_gives_exactly_the_float_heads_top_tokens(smollm2_llm):
    """At every step the verified tokens are the float head's top tokens, in order, with
    its logits; greedy and seeded top-k sampling draw the same tokens fused and unfused."""
    llm, model = smollm2_llm, smollm2_llm.model
    ids = llm.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")
    llm.ensure_cache(len(ids) + 40)
    step = decode.decoder_for(model)
    with torch.inference_mode():
        model(torch.tensor([ids]), torch.arange(len(ids)))
        token, pos = ids[-1], len(ids) - 1
        for want in (1, 50, 64, 8):
            full = step.step(token, pos, 0).logits.clone()
            top = step.step(token, pos, want)
            assert top.top_ids is not None and len(top.top_ids) >= want
            best = full.topk(len(top.top_ids))
            assert top.top_ids.tolist() == best.indices.tolist()
            torch.testing.assert_close(top.top_values, best.values, atol=1e-5, rtol=1e-5)
            token, pos = int(best.indices[0]), pos + 1
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=50, top_p=0.9)):
        runs = []
        for fused in (True, False):
            if not fused:
                decode.detach(model)
            generator = torch.Generator().manual_seed(7)
            with torch.inference_mode():
                runs.append(list(generate_tokens(model, ids, max_new_tokens=12, params=params, generator=generator)))
        assert decode.attach(model) is None
        assert runs[0] == runs[1], params


class _CountTorchCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.smollm2
def test_a_decode_step_is_one_native_call(smollm2_int4):
    """30 blocks used to cost ~700 torch calls a token; now the prefill is one forward and
    each greedy decode step one native call and (almost always) not a single torch call."""
    llm, model = smollm2_int4, smollm2_int4.model
    prompt = llm.tokenizer.encode("Hello, my name is")
    llm.ensure_cache(len(prompt) + 33)
    forwards: list[int] = []
    # A global hook (a hook on the model's own modules keeps the fused step off: hooks
    # expect to see every forward).
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: forwards.append(args[0].shape[1]) if m is model else None)
    calls = []
    native_step = decode.NativeDecoder.step

    def counting(self, *args):
        calls.append(1)
        return native_step(self, *args)

    decode.NativeDecoder.step = counting
    try:
        tokens = generate_tokens(model, prompt, max_new_tokens=33, params=SamplingParams(temperature=0))
        with torch.inference_mode():
            next(tokens)  # the prefill
            with _CountTorchCalls() as counter:
                rest = list(tokens)
    finally:
        decode.NativeDecoder.step = native_step
        handle.remove()
    assert len(rest) == 32 and len(calls) == 32
    assert forwards == [len(prompt)]  # the module hook sees the prefill, and then no forward
    # (a step whose fast head could not vouch for the best token samples from the exact
    # logits: a few torch calls then)
    assert counter.calls < 32, f"{counter.calls} torch calls in 32 greedy decode steps"


# ------------------------------------------------------------------ oneDNN packing memory


def _hwm_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _status_bytes(key: str) -> int:
    return int(Path("/proc/self/status").read_text().split(key + ":")[1].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads VmHWM from /proc (Linux)")
def test_packing_holds_each_weight_once(tmp_path):
    """Packing replaces each weight by its packed copy: the originals go as it proceeds
    (heap weights are freed, memory-mapped ones have their pages handed back), so packing
    grows the process by about one weight, not by all of them (a tp rank of a 1.1B model
    peaked at 2x its weights; a sequential rank held pages and copies both)."""
    from parrot_cli.checkpoint.load import _PageRelease
    from parrot_cli.checkpoint.store import _write_safetensors, load_safetensors
    from parrot_cli.kernels import can_pack, pack_linears

    if not can_pack(torch.device("cpu"), torch.float32):
        pytest.skip("oneDNN cannot pack fp32 here")
    n, count = 2048, 8
    each = n * n * 4  # 16 MB
    torch.manual_seed(0)
    # Heap weights: the peak grows by a weight or two (oneDNN's own buffers), not by all eight.
    model = torch.nn.Sequential(*[torch.nn.Linear(n, n, bias=False) for _ in range(count)]).requires_grad_(False)
    x = torch.randn(1, n)
    want = model(x)
    _hwm_reset()
    before = _status_bytes("VmRSS")
    assert pack_linears(model) == count
    assert _status_bytes("VmHWM") - before < 3 * each
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
    # Memory-mapped weights, their pages resident: handed back once packed.
    path = tmp_path / "w.safetensors"
    _write_safetensors(path, [(f"{i}", torch.randn(n, n) / n**0.5) for i in range(count)] + [("norm", torch.ones(n))])
    mapped = load_safetensors(path)
    norm = mapped.pop("norm")  # a tensor the model keeps mapped keeps the whole mapping alive
    model = torch.nn.Sequential(*[torch.nn.Linear(n, n, bias=False) for _ in range(count)]).requires_grad_(False)
    for i, layer in enumerate(model):
        layer.weight = torch.nn.Parameter(mapped[f"{i}"], requires_grad=False)
    want = model(x)  # every page read
    del mapped
    before = _status_bytes("VmRSS")
    pack_linears(model, _PageRelease([path]))
    assert _status_bytes("VmRSS") - before < 2 * each  # copies in, pages out: about even
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)  # oneDNN sums in its own order
    assert torch.equal(norm, torch.ones(n))
