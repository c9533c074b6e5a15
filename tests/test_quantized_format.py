"""The portable quantized-weight layout (`quantize/format.py`): packing, dequantization,
slicing and fusion, every way to read it wrong, and the loader building kernels from it.

A quantized checkpoint is written here by hand from a tiny converted model (the same
tensors `parrot quantize` writes), so these tests pin the format itself, not the tools
that produce it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.store import CONFIG_FILE, load_weights
from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.quantize.format import (
    QuantizationConfig,
    QuantizedWeight,
    pack_nibbles,
    unpack_nibbles,
)
from parrot_cli.quantize.qconfig import QUANT_CONFIG_FILE
from parrot_cli.quantize.weight_only import Int4Linear, Int8Linear, quantize_int4, quantize_int8
from tests.hf_factory import CASES_BY_ID, build, sample_ids


def test_nibbles_pack_low_first_and_round_trip():
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xA9]]
    assert torch.equal(unpack_nibbles(packed), codes)
    big = torch.randint(0, 16, (33, 64), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(big)), big)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))


def _int_zero_weight(n: int = 16, k: int = 64, g: int = 32, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(torch.float16)
    qzeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    qzeros[0, 0] = 0  # the edge GPTQ's v1 format gets wrong
    return QuantizedWeight(4, pack_nibbles(codes), scales, qzeros=qzeros)


def test_dequantize_follows_each_zero_kind():
    qw = _int_zero_weight()
    q = unpack_nibbles(qw.data).float().reshape(16, 2, 32)
    expected = (q - qw.qzeros.float()[..., None]) * qw.scales.float()[..., None]
    torch.testing.assert_close(qw.dequantize(), expected.reshape(16, 64), rtol=0, atol=0)
    # The same weights in tinygemm's float-zero form dequantize to the same values.
    as_float = QuantizedWeight(4, qw.data, qw.scales.float(), zeros=qw.tinygemm_zeros())
    torch.testing.assert_close(as_float.dequantize(), qw.dequantize(), rtol=0, atol=1e-6)
    int8 = quantize_int8(torch.randn(8, 40))
    torch.testing.assert_close(int8.dequantize(), int8.data.float() * int8.scales.float())


def test_act_order_perm_is_applied_on_input_columns():
    """Stored column j holds input perm[j]: dequantize puts it back at perm[j], and the
    kernel module gathers x[..., perm] before its matmul."""
    weight = torch.randn(32, 64)
    perm = torch.randperm(64)
    stored = quantize_int4(weight[:, perm].contiguous(), 32)
    stored.perm = perm
    torch.testing.assert_close(stored.dequantize()[:, perm], quantize_int4(weight[:, perm].contiguous(), 32).dequantize())
    layer = Int4Linear.from_quantized(stored, None)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = x.float() @ stored.dequantize().T
    torch.testing.assert_close(layer(x).float(), expected, atol=0.05, rtol=0.02)


def test_rows_columns_and_fusion():
    a, b = quantize_int4(torch.randn(16, 64), 32), quantize_int4(torch.randn(32, 64), 32)
    fused = QuantizedWeight.cat_rows([a, b])
    torch.testing.assert_close(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    torch.testing.assert_close(fused.select_rows(slice(16, 48)).dequantize(), b.dequantize())
    torch.testing.assert_close(fused.select_columns(32, 64).dequantize(), fused.dequantize()[:, 32:])
    with pytest.raises(ValueError, match="groups of 32"):
        fused.select_columns(16, 64)
    with pytest.raises(ValueError, match="cannot fuse"):
        QuantizedWeight.cat_rows([a, quantize_int4(torch.randn(16, 64), 64)])


@pytest.mark.parametrize("group", [32, 64, 128, 512])
def test_kernel_groups_repeat_scales_exactly(group):
    """A group torch's kernel does not take (512, per-channel GPTQ) runs there on repeated
    scales; the native kernels take it as stored. Either way the module computes
    x @ dequant(W)^T."""
    from parrot_cli.kernels.native import turned_off

    k = 512
    weight = _int_zero_weight(32, k, group)
    with turned_off():
        layer = Int4Linear.from_quantized(weight, None)
    x = torch.randn(2, k, dtype=torch.bfloat16)
    # torch's kernel computes in bf16 with bf16 scales and zeros: compare against those.
    sz_weight = QuantizedWeight(4, weight.data, weight.scales.to(torch.bfloat16).float(),
                                zeros=weight.tinygemm_zeros().to(torch.bfloat16).float())
    expected = x.float() @ sz_weight.dequantize().T
    torch.testing.assert_close(layer(x).float(), expected, atol=0.1, rtol=0.02)
    assert layer.backend == "torch" and layer.group_size == min(group, 256)
    native = Int4Linear.from_quantized(weight, None)
    if native.backend == "native":  # fp32 on the stored integer zeros: far closer
        assert native.group_size == group
        exact = x.double() @ weight.dequantize().double().T
        torch.testing.assert_close(native(x.float()).double(), exact, atol=2e-3, rtol=1e-3)


def test_int8_with_groups_is_requantized_per_channel_for_the_kernel():
    w = torch.randn(16, 64)
    grouped = QuantizedWeight(8, torch.randint(-127, 128, (16, 64), dtype=torch.int8),
                              torch.rand(16, 2).to(torch.bfloat16) * 0.01)
    layer = Int8Linear.from_quantized(grouped, None)
    deq = layer.weight.float() * layer.scales.float()[:, None]
    torch.testing.assert_close(deq, grouped.dequantize(), atol=grouped.dequantize().abs().max() / 127, rtol=0)
    del w


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t, m: t.pop("m.scales"), "m.scales is missing"),
        (lambda t, m: t.update({"m.qweight": t["m.qweight"].to(torch.int8)}), "not a torch.uint8 matrix"),
        (lambda t, m: t.update({"m.scales": t["m.scales"][:, :1]}), "group size 32 but the scales give 64"),
        (lambda t, m: t.update({"m.scales": t["m.scales"][:3]}), "for 16 outputs"),
        (lambda t, m: t.pop("m.qzeros"), "qzeros is missing"),
        (lambda t, m: t.update({"m.qzeros": t["m.qzeros"][:, :1]}), "do not match scales"),
        (lambda t, m: t.update({"m.zeros": t["m.scales"]}), "both zeros and qzeros"),
        (lambda t, m: m.update({"bits": 3}), "3 bits"),
        (lambda t, m: m.update({"act_order": True}), "disagree on act-order"),
        (lambda t, m: t.update({"m.perm": torch.arange(64, dtype=torch.int32)}), "not int64"),
    ],
)
def test_inconsistent_tensors_are_one_clear_error(damage, message):
    qw = _int_zero_weight()
    tensors, meta = qw.tensors("m."), dict(qw.meta())
    if "perm" in message or "int64" in message:
        meta["act_order"] = True
    damage(tensors, meta)
    with pytest.raises(CheckpointError, match=message):
        QuantizedWeight.from_tensors("m", tensors, meta)


def test_value_checks():
    qw = _int_zero_weight()
    qw.qzeros[1, 1] = 16
    with pytest.raises(CheckpointError, match="above 15"):
        qw.check_values("m")
    qw = quantize_int8(torch.randn(4, 8))
    qw.perm = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
    with pytest.raises(CheckpointError, match="not a permutation"):
        qw.check_values("m")


def test_config_round_trip_and_refusals():
    qc = QuantizationConfig("int4", "rtn", {"transformer.h.0.attn.qkv": {"bits": 4, "group_size": 32, "zero": "float"}})
    again = QuantizationConfig.from_dict(json.loads(json.dumps(qc.to_dict())))
    assert again == qc and again.summary() == "int4: int4 g32 (1)"
    with pytest.raises(CheckpointError, match="newer parrot"):
        QuantizationConfig.from_dict({**qc.to_dict(), "format_version": 99})
    with pytest.raises(CheckpointError, match="not a parrot quantization config"):
        QuantizationConfig.from_dict({"quant_method": "gptq"})


# --------------------------------------------------------------------------- a checkpoint


def write_quantized(float_dir, target, *, embedding: bool, bits: int = 4, group: int = 32):
    """A quantized copy of a float checkpoint in the portable layout, written by hand."""
    shutil.copytree(float_dir, target)
    state = load_weights(float_dir)
    out, modules = {}, {}
    for name, tensor in state.items():
        owner, _, kind = name.rpartition(".")
        linear = owner.startswith("transformer.h.") and kind == "weight" and tensor.dim() == 2
        if linear or (embedding and owner == "transformer.wte"):
            qw = quantize_int4(tensor, group) if bits == 4 and linear else quantize_int8(tensor)
            out.update(qw.tensors(owner + "."))
            modules[owner] = qw.meta()
        else:
            out[name] = tensor
    for f in target.glob("*.safetensors"):
        f.unlink()
    from parrot_cli.checkpoint.store import _write_safetensors

    _write_safetensors(target / "model.safetensors", list(out.items()))
    mode = "int4" if bits == 4 else "int8"
    (target / QUANT_CONFIG_FILE).write_text(json.dumps(QuantizationConfig(mode, "rtn", modules).to_dict()))
    return target


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory):
    case = CASES_BY_ID["llama-gqa-tied"]  # tied: the head reads the embedding
    hf = build(case, tmp_path_factory.mktemp("hf") / "tiny")
    return case, convert(hf, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize("embedding", [False, True])
def test_loader_runs_a_stored_int4_checkpoint_like_load_time_quantization(tiny_float, tmp_path, embedding):
    from parrot_cli import LLM
    from parrot_cli.quantize.weight_only import QuantizedEmbedding

    case, float_dir = tiny_float
    cfg = json.loads((float_dir / CONFIG_FILE).read_text())["config"]
    group = 32  # divides the tiny model's 64 and 96 inputs
    stored = write_quantized(float_dir, tmp_path / "q", embedding=embedding, group=group)
    ids = sample_ids(case, 12)
    on_disk = LLM.load(stored, device="cpu", precision="32-true")
    if embedding:
        assert isinstance(on_disk.model.transformer.wte, QuantizedEmbedding)
        assert getattr(on_disk.model.lm_head, "tied_embedding", False) == cfg["tie_embeddings"]
        ref = LLM.load(float_dir, device="cpu", precision="32-true", quantize="int4", group_size=group)
        # The same int8 table, dequantized, feeds the reference's embedding; its (packed)
        # head keeps the float table, so the head's int8 rounding and bf16 activations remain.
        table = quantize_int8(load_weights(float_dir)["transformer.wte.weight"]).dequantize()
        ref.model.transformer.wte.weight.copy_(table)
        expected = ref.logits(ids)
        got = on_disk.logits(ids)
        assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    else:
        at_load = LLM.load(float_dir, device="cpu", precision="32-true", quantize="int4", group_size=group)
        assert torch.equal(on_disk.logits(ids), at_load.logits(ids))
    # Asking for another mode names the float source; the same mode is accepted.
    with pytest.raises(UsageError, match="already holds int4"):
        LLM.load(stored, device="cpu", quantize="int8")
    LLM.load(stored, device="cpu", quantize="int4")


def test_loader_refuses_a_checkpoint_missing_its_quantized_tensors(tiny_float, tmp_path):
    from parrot_cli import LLM
    from parrot_cli.checkpoint.store import _write_safetensors

    _, float_dir = tiny_float
    stored = write_quantized(float_dir, tmp_path / "q", embedding=False, bits=8)
    state = load_weights(stored)
    name = next(k for k in state if k.endswith("attn.qkv.scales"))
    kept = [(k, v.clone()) for k, v in state.items() if k != name]
    del state
    _write_safetensors(stored / "model.safetensors", kept)
    with pytest.raises(CheckpointError, match="scales is missing"):
        LLM.load(stored, device="cpu")
    qc = json.loads((stored / QUANT_CONFIG_FILE).read_text())
    qc["modules"]["transformer.h.0.attn.bogus"] = {"bits": 8, "group_size": 4}
    (stored / QUANT_CONFIG_FILE).write_text(json.dumps(qc))
    with pytest.raises(CheckpointError, match="not a weight of this model"):
        LLM.load(stored, device="cpu")
