"""Every family, logit by logit against transformers (float32).

Each tiny randomly initialised transformers model is saved with save_pretrained, converted
by parrot and loaded through the public API; `LLM.logits` must equal the reference, and
decoding with the KV cache must equal the full forward at every position.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parrot_cli import LLM
from parrot_cli.checkpoint.convert import convert
from tests.hf_factory import (
    CASES,
    CASES_BY_ID,
    build,
    build_bin,
    build_sharded,
    hf_logits,
    hf_logits_incremental,
    sample_ids,
)

ATOL = RTOL = 1e-4


def _convert_and_load(hf_dir: Path, tmp_path: Path) -> LLM:
    out = convert(hf_dir, tmp_path / "parrot")
    return LLM.load(out, precision="32-true", device="cpu")


def _incremental(llm: LLM, ids: list[int], prefill: int) -> torch.Tensor:
    """Logits from a prefill of `prefill` tokens, then one token per forward."""
    model = llm.model
    model.setup_caches(1, len(ids))
    rows = []
    with torch.inference_mode():
        x = torch.tensor([ids[:prefill]])
        rows.append(model(x, torch.arange(prefill))[0])
        for pos in range(prefill, len(ids)):
            rows.append(model(torch.tensor([[ids[pos]]]), torch.tensor([pos]))[0])
    model.clear_caches()
    return torch.cat(rows).float()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_logits_match_transformers(case, tmp_path):
    hf_dir = build(case, tmp_path / "hf")
    llm = _convert_and_load(hf_dir, tmp_path)
    ids = sample_ids(case)
    expected = hf_logits(hf_dir, ids)
    got = llm.logits(ids)
    assert got.shape == (len(ids), case.vocab_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)

    # KV-cache decoding equals the full forward at every position. Dynamic NTK and
    # longrope change their frequencies with the length, so past the original context
    # cached keys keep older rotations: there the reference is transformers' own
    # incremental decoding.
    prefill = 3
    incremental = _incremental(llm, ids, prefill)
    length_dependent = (case.config_kwargs.get("rope_parameters") or {}).get("rope_type") in (
        "dynamic",
        "longrope",
    )
    reference = hf_logits_incremental(hf_dir, ids, prefill) if length_dependent else got
    torch.testing.assert_close(incremental, reference, atol=ATOL, rtol=RTOL)


def test_config_records_the_variant(tmp_path):
    """The converted config keeps what distinguishes the family variants."""
    hf_dir = build(CASES_BY_ID["falcon-7b-mqa"], tmp_path / "hf")
    cfg = _convert_and_load(hf_dir, tmp_path).config
    assert (cfg.family, cfg.n_query_groups, cfg.shared_attention_norm, cfg.parallel_residual) == (
        "falcon",
        1,
        True,
        True,
    )


@pytest.mark.parametrize("builder", [build_bin, build_sharded], ids=["bin", "sharded"])
def test_bin_and_sharded_sources(builder, tmp_path):
    case = CASES_BY_ID["llama-gqa-tied"]
    hf_dir = builder(case, tmp_path / "hf")
    llm = _convert_and_load(hf_dir, tmp_path)
    ids = sample_ids(case)
    torch.testing.assert_close(llm.logits(ids), hf_logits(hf_dir, ids), atol=ATOL, rtol=RTOL)


def test_bin_with_legacy_buffers(tmp_path):
    """Old .bin files carry rotary/mask buffers; they are not weights and are skipped."""
    case = CASES_BY_ID["neox-parallel-rot25"]
    hf_dir = build_bin(case, tmp_path / "hf", legacy_buffers=True)
    llm = _convert_and_load(hf_dir, tmp_path)
    ids = sample_ids(case)
    torch.testing.assert_close(llm.logits(ids), hf_logits(hf_dir, ids), atol=ATOL, rtol=RTOL)


def test_sharded_output_roundtrip(tmp_path, monkeypatch):
    """A checkpoint written in several shards (with an index) loads the same."""
    import parrot_cli.checkpoint.store as store

    monkeypatch.setattr(store, "SHARD_BYTES", 64 * 1024)
    case = CASES_BY_ID["neox-sequential-rot100"]
    hf_dir = build(case, tmp_path / "hf")
    out = convert(hf_dir, tmp_path / "parrot")
    assert (out / store.INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    llm = LLM.load(out, precision="32-true", device="cpu")
    ids = sample_ids(case)
    torch.testing.assert_close(llm.logits(ids), hf_logits(hf_dir, ids), atol=ATOL, rtol=RTOL)
