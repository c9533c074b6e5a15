"""`parrot quantize int4|int8`: quantized checkpoints written from float ones load to the
very modules load-time `--quantize` builds; damaged ones are one-line errors; an
interrupted run leaves nothing; the streaming writer holds no tensor it was given."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parrot_cli import LLM
from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.info import read_info, weight_files
from parrot_cli.checkpoint.store import CheckpointWriter, load_weights
from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.quantize.format import QuantizedWeight, pack_nibbles
from parrot_cli.quantize.qconfig import QUANT_CONFIG_FILE, read_quantization_config
from parrot_cli.quantize.save import default_target, quantize_checkpoint
from parrot_cli.quantize.weight_only import quantize_int4, tinygemm_pairs
from tests.conftest import run_parrot
from tests.hf_factory import CASES_BY_ID, build, sample_ids
from tests.test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied llama (GQA) converted to a float32 checkpoint."""
    case = CASES_BY_ID["llama-gqa-tied"]
    hf = build(case, tmp_path_factory.mktemp("hf") / "tiny")
    return case, convert(hf, tmp_path_factory.mktemp("float") / "tiny")


@pytest.mark.parametrize("mode, head", [("int4", False), ("int8", True), ("int4", True)])
def test_quantized_checkpoint_loads_to_the_load_time_modules(tiny, mode, head):
    case, float_dir = tiny
    result = quantize_checkpoint(float_dir, mode, quantize_head=head)
    group = result.config.details["group_size"]
    assert result.target == default_target(float_dir, mode, group, head)
    assert result.target.name == "tiny-" + (f"int4-g{group}" if mode == "int4" else "int8") + ("-head" if head else "")
    assert result.target_bytes < result.source_bytes
    stored = read_quantization_config(result.target)
    assert (stored.mode, stored.method) == (mode, "rtn")
    assert ("lm_head" in stored.modules) == head and "transformer.wte" not in stored.modules
    ids = sample_ids(case, 16)
    on_disk = LLM.load(result.target, device="cpu", precision="32-true")
    at_load = LLM.load(float_dir, device="cpu", precision="32-true", quantize=mode, quantize_head=head)
    assert torch.equal(on_disk.logits(ids), at_load.logits(ids))
    assert on_disk.weight_bytes() == at_load.weight_bytes()
    # The side files travel; the float weights do not stay behind.
    assert (result.target / "tokenizer.json").is_file() == (float_dir / "tokenizer.json").is_file()
    assert not any(k.endswith("attn.qkv.weight") for k in load_weights(result.target))


@pytest.mark.smollm2
def test_parrot_quantize_int4_round_trip_on_smollm2(smollm2_checkpoint, tmp_path):
    out = tmp_path / "smollm2-int4"
    result = run_parrot("quantize", "int4", "--checkpoint-dir", str(smollm2_checkpoint), "--group-size", "64",
                        "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "int4: int4 g64 (120)" in result.stderr and "smaller" in result.stderr
    assert f"--checkpoint-dir {out}" in result.stderr
    ids = LLM.load(out, device="cpu").tokenizer.encode("Quantized once, loaded many times: the same numbers.")
    on_disk = LLM.load(out, device="cpu", precision="32-true")
    at_load = LLM.load(smollm2_checkpoint, device="cpu", precision="32-true", quantize="int4", group_size=64)
    assert torch.equal(on_disk.logits(ids), at_load.logits(ids))
    # A quantized checkpoint is never quantized again; the errors name the float source.
    again = run_parrot("quantize", "int8", "--checkpoint-dir", str(out))
    assert_one_line_error(again, 2, "already holds int4", f"quantize the float checkpoint {smollm2_checkpoint}")
    with pytest.raises(UsageError, match=f"load the float checkpoint {smollm2_checkpoint} with --quantize int8"):
        LLM.load(out, device="cpu", quantize="int8")


@pytest.mark.smollm2
def test_killed_quantize_leaves_nothing(smollm2_checkpoint, tmp_path):
    """SIGTERM while writing: exit 130 as for Ctrl-C, no target, no partial directory."""
    out = tmp_path / "q"
    proc = subprocess.Popen(
        [sys.executable, "-m", "parrot_cli", "quantize", "int4", "--checkpoint-dir", str(smollm2_checkpoint),
         "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = tmp_path / "q.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partial.exists(), "quantizing never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Interrupted" in stderr
    assert not out.exists() and not partial.exists()


def test_damaged_quantized_checkpoints_are_one_line_errors(tiny, tmp_path):
    _, float_dir = tiny
    good = quantize_checkpoint(float_dir, "int8", output=tmp_path / "good").target

    # Truncated weights (a copy cut short).
    cut = shutil.copytree(good, tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    assert_one_line_error(run_parrot("generate", "Hi", "--checkpoint-dir", str(cut)), 1, "truncated")
    # A module's scales missing: the checkpoint and its quantization config disagree.
    from parrot_cli.checkpoint.store import _write_safetensors

    lost = shutil.copytree(good, tmp_path / "lost")
    state = load_weights(lost)
    kept = [(k, v.clone()) for k, v in state.items() if k != "transformer.h.0.mlp.fc.scales"]
    del state
    _write_safetensors(lost / "model.safetensors", kept)
    result = run_parrot("generate", "Hi", "--checkpoint-dir", str(lost))
    assert_one_line_error(result, 1, "transformer.h.0.mlp.fc", "scales is missing")
    # A config that says another shape, or is not JSON: library errors with the same text.
    for edit, message in (
        (lambda qc: qc["modules"]["transformer.h.1.attn.proj"].update(bits=4, zero="float"), "not a torch.uint8 matrix"),
        (lambda qc: qc["modules"].pop("transformer.h.1.attn.proj"), "does not match its config"),
        (lambda qc: qc.update(format_version=99), "newer parrot"),
    ):
        bad = shutil.copytree(good, tmp_path / f"bad-{message[:8]}")
        qc = json.loads((bad / QUANT_CONFIG_FILE).read_text())
        edit(qc)
        (bad / QUANT_CONFIG_FILE).write_text(json.dumps(qc))
        with pytest.raises(CheckpointError, match=message):
            LLM.load(bad, device="cpu")
    (bad / QUANT_CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        LLM.load(bad, device="cpu")


def test_usage_errors_before_writing(tiny, tmp_path):
    _, float_dir = tiny
    with pytest.raises(UsageError, match="--group-size 48 is not one"):
        quantize_checkpoint(float_dir, "int4", group_size=48, output=tmp_path / "x")
    with pytest.raises(UsageError, match="applies to --quantize int4 only"):
        quantize_checkpoint(float_dir, "int8", group_size=32, output=tmp_path / "x")
    with pytest.raises(UsageError, match="is the float checkpoint itself"):
        quantize_checkpoint(float_dir, "int8", output=float_dir)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


# --------------------------------------------------------------------------- portability


def test_the_cuda_packing_reads_the_portable_bytes():
    """An int4 checkpoint written on CPU loads on CUDA: packing happens at load, from the
    portable nibbles. tinygemm's CUDA packer takes bytes with input 2j in the high nibble
    (`tinygemm_pairs`): that is the stored byte with its nibbles swapped, bit for bit."""
    weight = torch.randn(48, 256)
    qw = quantize_int4(weight, 32)
    stored = qw.data  # what the checkpoint holds: input 2j low, 2j+1 high
    swapped = (stored << 4) | (stored >> 4)
    assert torch.equal(tinygemm_pairs(qw.codes().to(torch.int32)), swapped)
    codes = qw.codes()
    assert int(tinygemm_pairs(codes.int())[3, 5]) == int(codes[3, 10]) << 4 | int(codes[3, 11])
    # And the portable layout itself: packing the unpacked codes gives the stored bytes.
    assert torch.equal(pack_nibbles(codes), stored)
    same = QuantizedWeight.from_tensors("m", qw.tensors("m."), qw.meta())
    torch.testing.assert_close(same.dequantize(), qw.dequantize(), rtol=0, atol=0)


# --------------------------------------------------------------------------- the writer


def test_writer_streams_each_tensor_to_disk_as_it_comes(tiny, tmp_path):
    config = read_info(tiny[1]).config
    a = torch.arange(1000, dtype=torch.float32)
    # Room for one header entry: the second shard's 41 entries overflow it.
    with CheckpointWriter(tmp_path / "ckpt", shard_bytes=6000, expected_tensors=1) as writer:
        writer.add_tensor("a", a)
        a.zero_()  # already on disk: changing the caller's tensor changes nothing there
        writer.add_tensor("b", torch.ones(3, 500, dtype=torch.bfloat16))  # 4000 + 3000 > 6000
        for i in range(40):
            writer.add_tensor(f"a.long.tensor.name.{i:03d}", torch.tensor([i]))
        with pytest.raises(ValueError, match="added twice"):
            writer.add_tensor("b", torch.zeros(1))
        target = writer.commit(config, {"source": "test"})
    shards = weight_files(target)
    assert [s.name for s in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    state = load_weights(target)
    assert torch.equal(state["a"], torch.arange(1000, dtype=torch.float32))
    assert torch.equal(state["b"], torch.ones(3, 500, dtype=torch.bfloat16))
    assert [int(state[f"a.long.tensor.name.{i:03d}"]) for i in range(40)] == list(range(40))
    # Other readers take both headers: one padded with spaces (the format allows it), one
    # rewritten in front of the data when it outgrew its reservation.
    safetensors = pytest.importorskip("safetensors.torch")
    for shard in shards:
        for name, tensor in safetensors.load_file(shard).items():
            assert torch.equal(tensor, state[name])


def test_a_shard_that_cannot_flush_on_a_full_disk_still_leaves_no_partial(tmp_path):
    """On a full disk the shard's buffered tail fails again when the writer closes it on
    the way out; that second ENOSPC must not skip the removal of `.partial` (CI once left
    `model-00001.safetensors` behind this way). /dev/full is a real full device."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    target = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(target) as writer:
            (writer.partial / "model-00001.safetensors").symlink_to("/dev/full")
            writer.add_tensor("a", torch.ones(16))  # buffered: the flush at close fails
            raise KeyboardInterrupt
    assert not writer.partial.exists() and not target.exists()
