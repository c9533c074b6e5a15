"""`--quantize` at load time on the real SmolLM2-135M: every mode loads, generates, keeps
its perplexity close to the fp32 model's, and shrinks the quantized layers; impossible
requests are one-sentence usage errors raised before any weight is read.

Each mode is loaded once (in 32-true, so the ratio measures the quantization and not the
working precision; int8/int4 compute in bf16 whatever the precision)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parrot_cli.api import cpu_has_native_bf16
from parrot_cli.checkpoint.store import read_info, read_safetensors_header
from parrot_cli.errors import UsageError
from parrot_cli.kernels import PackedLinear
from parrot_cli.quantize import plan
from parrot_cli.quantize.apply import quantized_layers
from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear, quantize_int4
from tests.conftest import run_parrot
from tests.test_cli import assert_one_line_error

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()

# mode -> (perplexity ratio bound over fp32, bytes of the quantized layers / their bf16 bytes)
BOUNDS = {
    "int8": (1.02, 0.55),
    "llm.int8": (1.02, 0.55),
    "int4": (1.5, 0.35),  # at group size 64: g32 re-creates this Q4_1-derived model's grid
    "bnb.nf4": (1.5, 0.35),
    "bnb.nf4-dq": (1.5, 0.35),
    # FP4's grid fits these weights worst: 1.54x on this text (1.38-1.56x over three
    # texts tried); see the report. The bound still catches a broken layer (>> 2x).
    "bnb.fp4": (1.6, 0.35),
    "bnb.fp4-dq": (1.6, 0.35),
}


@pytest.fixture(scope="module")
def reference_ppl(smollm2_llm) -> float:
    return smollm2_llm.perplexity(TEXT)


@pytest.mark.smollm2
@pytest.mark.parametrize("mode", list(BOUNDS))
def test_mode_loads_generates_and_keeps_quality(mode, smollm2_checkpoint, smollm2_llm, reference_ppl):
    from parrot_cli import LLM

    llm = LLM.load(smollm2_checkpoint, precision="32-true", device="cpu", quantize=mode,
                   group_size=64 if mode == "int4" else None)
    config = llm.config
    layers = quantized_layers(llm.model)
    # Every Linear of every block, and nothing else (embedding, norms and head stay).
    assert sorted(layers) == sorted(
        f"transformer.h.{i}.{name}" for i in range(config.n_layer)
        for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    )
    assert llm.model.transformer.wte.weight.dtype == torch.float32

    text = llm.generate("Hello, my name is", max_new_tokens=8, temperature=0)
    assert len(llm.tokenizer.encode(text)) >= 4 and text.strip()

    ratio = llm.perplexity(TEXT) / reference_ppl
    max_ratio, max_bytes = BOUNDS[mode]
    assert ratio <= max_ratio, f"{mode}: perplexity {ratio:.3f}x the fp32 model's"

    def stored(module) -> int:
        return module.nbytes + sum(p.numel() * p.element_size() for p in module.parameters())

    quantized = sum(stored(m) for m in layers.values())
    as_bf16 = sum(m.in_features * m.out_features * 2 for m in layers.values())
    assert quantized <= max_bytes * as_bf16, f"{mode}: {quantized / as_bf16:.1%} of bf16"
    # LLM.weight_bytes reports the quantized bytes: the fp32 model's total, with these
    # layers' fp32 bytes replaced by what they now hold (and without a oneDNN-packed copy
    # of the tied head, which only the torch decode path makes).
    as_fp32 = 2 * as_bf16

    # (nor the int8 mirror of a float head that only the fused native decode step reads).
    from parrot_cli.kernels.decode import attached

    def head_copy(m) -> int:
        fused = attached(m.model)
        mirror = fused.mirror_bytes() if fused else 0
        return mirror + (m.model.lm_head.nbytes if isinstance(m.model.lm_head, PackedLinear) else 0)

    assert (llm.weight_bytes() - head_copy(llm)
            == smollm2_llm.weight_bytes() - head_copy(smollm2_llm) - as_fp32 + quantized)


def test_weight_only_layers_match_their_dequantized_weights():
    """The packed kernels compute x @ dequant(W)^T, for bf16 and fp32 activations (the
    latter cast to bf16 around the kernel and back), prefill-sized inputs included."""
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 96) * 0.1, torch.randn(64) * 0.1
    int8 = Int8Linear.from_float(weight, bias)
    deq8 = int8.weight.float() * int8.scales.float()[:, None]
    int4 = Int4Linear.from_float(weight, bias, 32)
    deq4 = quantize_int4(weight, 32).dequantize()
    assert (deq4 - weight).abs().max() < (weight.abs().max() / 7)  # 4-bit, not garbage
    for layer, deq in ((int8, deq8), (int4, deq4)):
        for rows, dtype in ((1, torch.bfloat16), (1, torch.float32), (40, torch.float32)):
            x = torch.randn(2, rows, 96).to(dtype)
            y = layer(x)
            assert y.shape == (2, rows, 64) and y.dtype == dtype
            expected = x.to(torch.bfloat16).float() @ deq.T + bias
            torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.smollm2
def test_group_size_defaults_per_model(smollm2_checkpoint):
    info = read_info(smollm2_checkpoint)
    cpu = torch.device("cpu")
    # Weights from a Q4_1 GGUF: blocks of 32 keep their grid; otherwise the largest
    # group dividing 576 and 1536.
    assert plan("int4", info.config, cpu, provenance=info.provenance).group_size == 32
    assert plan("int4", info.config, cpu, provenance={}).group_size == 64
    assert plan("bnb.int8", info.config, cpu).mode.name == "llm.int8"  # the alias
    assert plan("none", info.config, cpu) is None
    with pytest.raises(UsageError, match="runs on CPU or CUDA, not on mps"):
        plan("bnb.nf4", info.config, torch.device("mps"))
    with pytest.raises(UsageError, match="applies to --quantize int4 only"):
        plan("int8", info.config, cpu, group_size=64, group_size_from_user=True)


@pytest.fixture(scope="module")
def weightless(smollm2_checkpoint, tmp_path_factory) -> Path:
    """The checkpoint without its weights: a usage error must come before they are read."""
    target = tmp_path_factory.mktemp("weightless") / "SmolLM2"
    shutil.copytree(smollm2_checkpoint, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


@pytest.mark.smollm2
def test_usage_errors_come_before_loading(weightless):
    base = ["generate", "Hi", "--checkpoint-dir", str(weightless), "--max-new-tokens", "2"]
    unknown = run_parrot(*base, "--quantize", "int3")
    assert_one_line_error(unknown, 2, "Unknown quantization mode 'int3'", "llm.int8", "int4")
    group = run_parrot(*base, "--quantize", "int4", "--group-size", "128")
    assert_one_line_error(group, 2, "--group-size 128 does not divide the input size 576",
                          "--group-size 32 or 64")
    # bitsandbytes missing: the import fails as it does when the package is absent.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "from parrot_cli.cli import main\n"
        f"main({base + ['--quantize', 'bnb.nf4']!r})\n"
    )
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env=os.environ)
    assert_one_line_error(missing, 2, "--quantize bnb.nf4 needs bitsandbytes", "pip install")


@pytest.mark.smollm2
def test_generate_int4_reports_its_weight_memory(smollm2_checkpoint):
    result = run_parrot("generate", "Hello, my name is", "--checkpoint-dir", str(smollm2_checkpoint),
                        "--quantize", "int4", "--group-size", "64", "--max-new-tokens", "6",
                        "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "int4 g64)" in result.stderr, result.stderr
    weights = float(re.search(r"\(weights ([0-9.]+) GB", result.stderr)[1])
    # int4 blocks (~0.07 GB) plus the embedding and its packed head copy in the working
    # precision: bf16 where the CPU has it (~0.11), else fp32 (~0.23); fp32 blocks alone
    # would be 0.42 GB.
    assert weights <= (0.2 if cpu_has_native_bf16() else 0.3), result.stderr


PEAK_MARGIN = 128 * 2**20  # tokenizer (~50 MB), torch's first-use allocations (~55 MB), one block


@pytest.mark.smollm2
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_int8_load_never_holds_the_float_model(smollm2_checkpoint):
    """Peak RSS while loading with int8 stays below the float (bf16, this CPU's default)
    model's size plus PEAK_MARGIN above the process before loading. Loading the whole
    float model first and quantizing after would exceed it by the int8 copy (~160 MB)."""
    code = (
        "import json, psutil\n"
        "from parrot_cli.api import LLM\n"
        "before = psutil.Process().memory_info().rss\n"
        f"llm = LLM.load({str(smollm2_checkpoint)!r}, device='cpu', precision='bf16-true', quantize='int8')\n"
        # VmHWM, not ru_maxrss: a forked child inherits ru_maxrss from its (large) parent.
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "peak = int(hwm.split()[1]) * 1024\n"
        "print(json.dumps({'before': before, 'peak': peak, 'weights': llm.weight_bytes()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    numbers = json.loads(out.stdout.strip().splitlines()[-1])
    table, _ = read_safetensors_header(smollm2_checkpoint / "model.safetensors")
    params = sum(math.prod(e["shape"]) for name, e in table.items() if name != "__metadata__")
    float_bytes = 2 * params  # the model in bf16 (the tied head stored once)
    grown = numbers["peak"] - numbers["before"]
    assert grown <= float_bytes + PEAK_MARGIN, (grown / 2**20, float_bytes / 2**20)
