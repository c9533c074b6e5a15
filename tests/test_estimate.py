"""`parrot estimate`: the planner's weights and KV cache equal what parrot holds once loaded
(the same bytes `LLM.weight_bytes` and `LLM.cache_bytes` report), for float and quantized
weights; registry models are planned from their config alone, without torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from parrot_cli import LLM
from parrot_cli.checkpoint.convert import convert
from parrot_cli.config import KNOWN_MODELS
from parrot_cli.errors import UsageError
from parrot_cli.estimate import describe_model, estimate
from tests.hf_factory import CASES_BY_ID, build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    where = tmp_path_factory.mktemp("tiny")
    return convert(build(CASES_BY_ID["llama-bias"], where / "hf"), where / "parrot", dtype="float32")


@pytest.mark.smollm2
def test_float_weights_and_cache_are_what_parrot_holds(smollm2_llm, smollm2_checkpoint):
    source = describe_model(str(smollm2_checkpoint))
    plan = estimate(source.config, precision="32-true", device_type="cpu", max_seq_length=2048)
    rank = plan.ranks[0]
    assert rank.weights == smollm2_llm.weight_bytes()  # the tied head's oneDNN copy included
    assert rank.kv_cache == smollm2_llm.cache_bytes(2048)


@pytest.mark.parametrize("mode", ["int8", "int4", "llm.int8"])
def test_quantized_weights_are_what_parrot_holds(tiny, mode):
    source = describe_model(str(tiny))
    llm = LLM.load(tiny, precision="32-true", device="cpu", quantize=mode)
    group = llm.quantization.group_size
    plan = estimate(source.config, precision="32-true", device_type="cpu", quantize=mode, group_size=group)
    assert plan.ranks[0].weights == llm.weight_bytes()


def test_registry_models_plan_from_their_config_alone():
    falcon7 = KNOWN_MODELS["tiiuae/falcon-7b"].config
    plan = estimate(falcon7, precision="bf16-true", device_type="cuda", max_seq_length=64)
    assert plan.ranks[0].weights == falcon7.num_parameters() * 2  # bf16, tied head
    # GPTQ int4 in groups of 128: half a byte a weight plus 4 bytes of scale and zero per group.
    falcon40 = KNOWN_MODELS["tiiuae/falcon-40b"].config
    gptq = estimate(falcon40, quantize="gptq.int4", max_seq_length=64).ranks[0]
    assert 20e9 < gptq.weights < 24e9
    fsdp = estimate(falcon40, strategy="fsdp", devices=4, max_seq_length=64).ranks
    whole = estimate(falcon40, max_seq_length=64).ranks[0].weights
    assert len(fsdp) == 1 and fsdp[0].weights - fsdp[0].gathered == pytest.approx(whole / 4, rel=1e-6)
    offload = estimate(falcon40, strategy="fsdp", devices=2, cpu_offload=True, max_seq_length=64).ranks[0]
    assert offload.weights == offload.gathered and offload.host == pytest.approx(whole / 2, rel=1e-6)
    tp = estimate(falcon40, strategy="tp", devices=4, max_seq_length=64).ranks[0]
    assert whole / 4 < tp.weights < whole / 3  # blocks split, embedding replicated
    seq = estimate(falcon40, strategy="sequential", devices=4, max_seq_length=64).ranks
    assert [r.layers for r in seq] == ["0-14", "15-29", "30-44", "45-59"]
    with pytest.raises(UsageError, match="71 attention heads do not split over 2"):
        estimate(falcon7, strategy="tp", devices=2)


def test_estimate_command_needs_no_torch_and_no_download():
    code = (
        "import sys, io, contextlib, json\n"
        "from parrot_cli.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: main(['estimate', '-m', 'tiiuae/falcon-40b', '--quantize', 'gptq.int4', '--json'])\n"
        "    except SystemExit as e: assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules\n"
        "print(buf.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["quantization"] == "gptq.int4" and data["ranks"][0]["total"] > data["ranks"][0]["weights"]


def test_estimate_table_names_each_part():
    from parrot_cli.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as done:
        main(["estimate", "-m", "stabilityai/stablelm-base-alpha-3b", "--strategy", "sequential", "--devices", "2"])
    assert done.value.code == 0
    text = buf.getvalue()
    for word in ("weights", "KV cache", "activations", "overhead", "rank 0", "rank 1", "0-7", "8-15"):
        assert word in text


@pytest.mark.parametrize(("bits", "embedding", "case"), [(4, False, "llama-bias"), (8, True, "llama-gqa-tied"),
                                                         (4, True, "llama-gqa-tied")])
def test_quantized_checkpoints_are_planned_from_their_table(tmp_path, bits, embedding, case):
    from tests.test_quantized_format import write_quantized

    float_dir = convert(build(CASES_BY_ID[case], tmp_path / "hf"), tmp_path / "float", dtype="float32")
    stored = write_quantized(float_dir, tmp_path / "q", embedding=embedding, bits=bits)
    source = describe_model(str(stored))
    assert source.stored_mode == f"int{bits}"
    plan = estimate(source.config, precision="32-true", device_type="cpu", stored=source.stored_modules,
                    stored_mode=source.stored_mode)
    assert plan.ranks[0].weights == LLM.load(stored, precision="32-true", device="cpu").weight_bytes()
