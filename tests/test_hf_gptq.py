"""The Hugging Face GPTQ format: bit packing against hand-computed words, the v1 zero-point
edge cases, act-order permutations, and imports of checkpoints made by an independent
implementation (gptqmodel 7.6, tests/data/gptq/, see make_fixture.py there) that must give
the logits of the float model holding the same dequantized weights.

The reference dequantization below is this test's own, written from the format's
published description (research/gptq.md §2): it shares no code with parrot's decoder."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from parrot_cli.checkpoint.hf_gptq import (
    SYM_WORD,
    decode_linear,
    encode_linear,
    pack_words,
    read_gptq_config,
    unpack_words,
    zeros_from_v1,
    zeros_to_v1,
)
from parrot_cli.checkpoint.hub import select_files
from parrot_cli.errors import CheckpointError
from parrot_cli.quantize.format import QuantizedWeight, pack_nibbles

FIXTURES = Path(__file__).parent / "data" / "gptq"
FIXTURE_IDS = ("llama-gqa-g32-asym-actorder", "neox-g32-sym", "falcon-newarch-gc-sym-actorder")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def parrot_in_process(*args: str) -> Result:
    """The real CLI entry point in this process (no torch import per call): exit code and
    what it printed."""
    from parrot_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------- the reference


def reference_unpack(words: torch.Tensor, along_rows: bool) -> torch.Tensor:
    """Value j of a 32-bit word lies in bits 4j..4j+3; qweight packs 8 inputs (rows) per
    word, qzeros 8 outputs (columns)."""
    out = []
    for word in (words.to(torch.int64) & 0xFFFFFFFF).flatten().tolist():
        out.append([(word >> (4 * j)) & 0xF for j in range(8)])
    values = torch.tensor(out).reshape(*words.shape, 8)
    if along_rows:  # [R, C, 8] -> [R, 8, C] -> [8R, C]
        return values.permute(0, 2, 1).reshape(words.size(0) * 8, words.size(1))
    return values.reshape(words.size(0), words.size(1) * 8)


def reference_dequantize(tensors: dict[str, torch.Tensor], prefix: str, v1: bool = True) -> torch.Tensor:
    """nn.Linear weight [N, K] = (scales[g_idx] * (q - z[g_idx]))^T; v1 zeros stored minus one."""
    q = reference_unpack(tensors[prefix + ".qweight"], True).float()  # [K, N]
    words = tensors[prefix + ".qzeros"].to(torch.int64)
    if v1:
        words = (words + 0x11111111) & 0xFFFFFFFF
    z = reference_unpack(words, False).float()  # [G, N]
    scales = tensors[prefix + ".scales"].float()
    g_idx = tensors[prefix + ".g_idx"].long()
    return (scales[g_idx] * (q - z[g_idx])).T


def float_reference(gptq_dir: Path):
    """The transformers float model of a GPTQ directory, holding its dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from parrot_cli.checkpoint.store import load_safetensors

    config = AutoConfig.from_pretrained(gptq_dir)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    tensors = {}
    for path in sorted(gptq_dir.glob("*.safetensors")):
        tensors.update(load_safetensors(path))
    modules = {name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")}
    state = {}
    for name, t in tensors.items():
        owner, _, kind = name.rpartition(".")
        if owner in modules and kind in ("qweight", "qzeros", "scales", "g_idx"):
            if kind == "qweight":
                state[owner + ".weight"] = reference_dequantize(tensors, owner)
        else:
            state[name] = t.float()
    if "embed_out.weight" in state and "embed_out.weight" not in model.state_dict():
        state["lm_head.weight"] = state.pop("embed_out.weight")  # transformers 5's name for NeoX's head
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.eval()


# --------------------------------------------------------------------------- bits


def test_pack_unpack_against_hand_computed_words():
    # One column of qweight: inputs 0..7 hold 1..8 -> nibbles from the low end.
    column = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]])
    word = pack_words(column, 0)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert int(word) & 0xFFFFFFFF == 0x87654321
    assert torch.equal(unpack_words(word, 0), column.to(torch.uint8))
    # One row of qzeros: outputs 0..7 hold 15, 0, 1, ..., 6.
    row = torch.tensor([[15, 0, 1, 2, 3, 4, 5, 6]])
    word = pack_words(row, 1)
    assert int(word) & 0xFFFFFFFF == 0x6543210F
    assert torch.equal(unpack_words(word, 1), row.to(torch.uint8))
    assert torch.equal(reference_unpack(word, False), row)
    # Random round trips both ways, and agreement with the reference unpacker.
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 24), generator=gen)
    for dim in (0, 1):
        words = pack_words(codes, dim)
        assert torch.equal(unpack_words(words, dim), codes.to(torch.uint8))
        assert torch.equal(reference_unpack(words, dim == 0), codes)
    with pytest.raises(ValueError, match="0..15"):
        pack_words(torch.tensor([[16]] * 8), 0)


def test_v1_zero_points_and_the_zero_of_zero():
    # Symmetric files: z = 8 everywhere is the word 0x77777777 in v1.
    eights = torch.full((1, 8), 8)
    assert int(zeros_to_v1(pack_words(eights, 1))) & 0xFFFFFFFF == SYM_WORD
    assert torch.equal(unpack_words(zeros_from_v1(torch.tensor([[SYM_WORD]], dtype=torch.int32)), 1),
                       eights.to(torch.uint8))
    # z = 0 in output 0: the word-level subtraction borrows from output 1's nibble...
    zeros = torch.tensor([[0, 5, 15, 1, 8, 0, 0, 3]])
    v1 = zeros_to_v1(pack_words(zeros, 1))
    per_nibble = reference_unpack(v1, False) + 1  # what a per-nibble "+1" decoder reads
    assert not torch.equal(per_nibble, zeros)  # ...which such decoders get wrong,
    assert torch.equal(unpack_words(zeros_from_v1(v1), 1), zeros.to(torch.uint8))  # the word-level add not
    # With every z >= 1 the per-nibble and word-level decoders agree: what parrot exports.
    safe = zeros.clamp(min=1)
    v1 = zeros_to_v1(pack_words(safe, 1))
    assert torch.equal(reference_unpack(v1, False) + 1, safe)


def _random_qw(n: int, k: int, group: int, act_order: bool, seed: int = 0, min_zero: int = 1) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(min_zero, 16, (n, k // group), generator=gen).to(torch.uint8)
    perm = torch.randperm(k, generator=gen) if act_order else None
    return QuantizedWeight(4, pack_nibbles(codes), scales, qzeros=zeros, perm=perm)


@pytest.mark.parametrize("act_order", [False, True])
def test_export_and_import_are_inverse_and_match_the_published_formula(act_order):
    from parrot_cli.checkpoint.hf_gptq import GPTQFileConfig

    qw = _random_qw(48, 96, 32, act_order)
    hf = encode_linear(qw)
    assert hf["qweight"].shape == (12, 48) and hf["qzeros"].shape == (3, 6)
    assert hf["scales"].dtype == torch.float16 and hf["g_idx"].dtype == torch.int32
    g_idx = hf["g_idx"].long()
    assert torch.equal(torch.bincount(g_idx), torch.full((3,), 32))  # groups of exactly 32
    monotonic = bool((g_idx[1:] >= g_idx[:-1]).all())
    assert monotonic != act_order
    # The test's own decoder of the HF tensors gives parrot's dequantized weight (the
    # bf16 scales are exact in fp16).
    reference = reference_dequantize({f"m.{k}": v for k, v in hf.items()}, "m")
    torch.testing.assert_close(reference, qw.dequantize(), rtol=0, atol=0)
    back = decode_linear("m", hf, GPTQFileConfig(4, 32, sym=False, desc_act=act_order, v1=True))
    torch.testing.assert_close(back.dequantize(), qw.dequantize(), rtol=0, atol=0)
    assert (back.perm is None) == (not act_order)
    if act_order:  # inputs sorted by group: each group contiguous again, in input order within
        assert torch.equal(back.perm, torch.argsort(g_idx, stable=True))
    with_zero = _random_qw(16, 32, 32, act_order=False)
    with_zero.qzeros[3, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        encode_linear(with_zero)


def test_act_order_layers_run_on_the_kernel_with_the_input_permutation():
    """An act-order weight is served by gathering x[..., perm] into the int4 kernel (parrot's
    native one reading the stored codes, and torch's packed one): the output is
    x @ dequant(W)^T, and nothing is dequantized per call."""
    import contextlib

    from parrot_cli.kernels import native
    from parrot_cli.quantize.weight_only import Int4Linear

    qw = _random_qw(64, 128, 32, act_order=True, seed=3)
    x = torch.randn(3, 128)
    expected = x.to(torch.bfloat16).float() @ qw.dequantize().T
    backends = ("native", "torch") if native.library() is not None else ("torch",)
    for backend in backends:
        with contextlib.nullcontext() if backend == "native" else native.turned_off():
            layer = Int4Linear.from_quantized(qw, None)
            plain = Int4Linear.from_quantized(QuantizedWeight(4, qw.data, qw.scales, qzeros=qw.qzeros), None)
        assert layer.backend == backend and layer.perm is not None
        if backend == "torch":
            assert layer.packed.dtype == torch.uint8  # packed once, at load
        torch.testing.assert_close(layer(x), expected, atol=0.05, rtol=0.02)
        # Without the permutation the same codes compute something else.
        assert (plain(x) - expected).abs().max() > 0.1, backend


# --------------------------------------------------------------------------- imports


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    from parrot_cli.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("gptq-imports")
    return {name: convert(FIXTURES / name, root / name) for name in FIXTURE_IDS}


@pytest.mark.parametrize("name", FIXTURE_IDS)
def test_gptqmodel_checkpoints_import_as_int4_and_match_the_float_reference(name, imported):
    from parrot_cli import LLM
    from parrot_cli.checkpoint.store import load_weights
    from parrot_cli.quantize.apply import quantized_layers
    from parrot_cli.quantize.weight_only import Int4Linear

    target = imported[name]
    qconfig = json.loads((target / "quantization_config.json").read_text())
    assert qconfig["mode"] == "gptq.int4" and qconfig["method"] == "hf-gptq"
    meta = json.loads((FIXTURES / name / "fixture.json").read_text())
    assert qconfig["details"]["desc_act"] == meta["quantize_config"]["desc_act"]
    # int4 on disk: no float weight of any block Linear, codes in uint8
    stored = load_weights(target)
    assert not [k for k in stored if k.startswith("transformer.h.") and k.endswith(("qkv.weight", "fc.weight"))]
    assert stored["transformer.h.0.attn.qkv.qweight"].dtype == torch.uint8
    assert ("transformer.h.0.attn.qkv.perm" in stored) == (name == "llama-gqa-g32-asym-actorder")

    llm = LLM.load(target, device="cpu", precision="32-true")
    layers = quantized_layers(llm.model)
    assert len(layers) == 4 * llm.config.n_layer  # and int4 in memory
    assert all(isinstance(m, Int4Linear) and m.quantization == "gptq.int4" for m in layers.values())
    ids = torch.randint(0, llm.config.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = float_reference(FIXTURES / name)(torch.tensor([ids])).logits[0]
    got = llm.logits(ids)
    # parrot's int4 kernels compute in bf16: ~0.4% of the logits' range
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 0.006 * scale, (float((got - ref).abs().max()), scale)


def _copy(name: str, tmp_path: Path) -> Path:
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def _edit_config(d: Path, file: str, **changes) -> None:
    path = d / file
    data = json.loads(path.read_text())
    target = data.get("quantization_config", data) if file == "config.json" else data
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
    path.write_text(json.dumps(data))


def _edit_tensors(d: Path, edit) -> None:
    from parrot_cli.checkpoint.store import _write_safetensors, load_safetensors

    path = d / "model.safetensors"
    tensors = {k: v.clone() for k, v in load_safetensors(path).items()}
    edit(tensors)
    path.unlink()
    _write_safetensors(path, sorted(tensors.items()))


def _rename_qzeros(t: dict) -> None:
    name = next(k for k in t if k.endswith(".qzeros"))
    t[name.replace("qzeros", "zeros")] = t.pop(name).float()


def _disagreeing_g_idx(t: dict) -> None:
    name = "model.layers.0.self_attn.k_proj.g_idx"
    t[name] = torch.flip(t[name], dims=[0])  # still 32 inputs per group, another order


BAD = [
    ("bits", lambda d: (_edit_config(d, "config.json", bits=8), _edit_config(d, "quantize_config.json", bits=8)),
     "8-bit weights", "4-bit GPTQ only"),
    ("method", lambda d: _edit_config(d, "config.json", quant_method="awq"), "quantized with 'awq'", "float original"),
    ("marlin", lambda d: _edit_config(d, "config.json", checkpoint_format="marlin", format="marlin"),
     "Marlin kernel layout", "format \"gptq\""),
    ("float zeros", lambda d: _edit_tensors(d, _rename_qzeros), "float zero points", "integer qzeros"),
    ("g_idx", lambda d: _edit_tensors(d, _disagreeing_g_idx), "q/k/v_proj", "same g_idx"),
    ("shape", lambda d: _edit_tensors(d, lambda t: t.update({
        "model.layers.1.mlp.down_proj.scales": t["model.layers.1.mlp.down_proj.scales"][:2]})),
     "down_proj is inconsistent", "scales"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_unsupported_and_broken_gptq_files_are_one_clear_error(case, tmp_path):
    _, edit, *fragments = case
    d = _copy("llama-gqa-g32-asym-actorder", tmp_path)
    edit(d)
    result = parrot_in_process("convert", str(d), "-o", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_settings_come_from_quantize_config_json_and_v2_is_read_as_is(tmp_path):
    d = _copy("neox-g32-sym", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.pop("quantization_config")
    (d / "config.json").write_text(json.dumps(config))
    found = read_gptq_config(d, config)
    assert (found.bits, found.group_size, found.sym, found.desc_act, found.v1) == (4, 32, True, False, True)
    # The same weights declared v2 (zeros stored as-is) read one step lower: 7 instead of 8.
    _edit_config(d, "quantize_config.json", checkpoint_format="gptq_v2", format="gptq_v2")
    v2 = read_gptq_config(d, config)
    assert not v2.v1
    from parrot_cli.checkpoint.store import load_safetensors

    t = load_safetensors(d / "model.safetensors")
    p = "gpt_neox.layers.0.attention.dense"
    parts = {k: t[f"{p}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert int(decode_linear(p, parts, found).qzeros.unique()) == 8
    assert int(decode_linear(p, parts, v2).qzeros.unique()) == 7


def test_hub_file_selection_takes_gptq_files():
    names = ["config.json", "quantize_config.json", "gptq_model-4bit-128g.safetensors", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "README.md", "LICENSE"]
    assert select_files(names) == sorted(
        ["config.json", "quantize_config.json", "gptq_model-4bit-128g.safetensors", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json"])


def test_download_of_a_gptq_repo_converts_it_to_gptq_int4(tmp_path, imported):
    """`parrot download ORG/NAME-GPTQ` against a real HTTP hub: TheBloke's layout (settings in
    quantize_config.json only, weights in gptq_model-4bit-32g.safetensors)."""
    import os
    import subprocess

    from tests.hub_server import HubServer, Repo

    name = "llama-gqa-g32-asym-actorder"
    d = _copy(name, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config.pop("quantization_config")
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").rename(d / "gptq_model-4bit-32g.safetensors")
    (d / "fixture.json").unlink()
    (d / "README.md").write_text("# a GPTQ repo\n")
    repo_id = "parrot-tests/tiny-GPTQ"
    server = HubServer(repos={repo_id: Repo.from_dir(d)}).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": server.url, "PARROT_HOME": str(tmp_path / "home"),
               "PARROT_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_TOKEN": ""}
        result = subprocess.run([sys.executable, "-m", "parrot_cli", "download", repo_id], capture_output=True,
                                text=True, timeout=300, env=env)
        fetched = sorted(r.path.rsplit("/", 1)[1] for r in server.file_gets(repo_id) if r.method == "GET")
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert fetched == ["config.json", "generation_config.json", "gptq_model-4bit-32g.safetensors",
                       "quantize_config.json"]
    target = tmp_path / "home" / "checkpoints" / repo_id
    assert json.loads((target / "quantization_config.json").read_text())["mode"] == "gptq.int4"

    from parrot_cli import LLM

    ids = [5, 17, 99, 3, 42, 8]
    downloaded = LLM.load(target, device="cpu", precision="32-true")
    local = LLM.load(imported[name], device="cpu", precision="32-true")
    assert torch.equal(downloaded.logits(ids), local.logits(ids))


def test_a_bad_group_count_in_g_idx_is_refused():
    from parrot_cli.checkpoint.hf_gptq import GPTQFileConfig

    hf = encode_linear(_random_qw(16, 64, 32, act_order=False))
    hf["g_idx"] = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="act-order groups hold 24 to 40 inputs, not 32"):
        decode_linear("m", hf, GPTQFileConfig(4, 32, sym=True, desc_act=True, v1=True))
