"""Checks that every tiny transformers case builds, saves, reloads and runs (fast)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from tests.hf_factory import (  # noqa: E402
    CASES,
    CASES_BY_ID,
    FAMILIES,
    Case,
    build,
    build_bin,
    build_sharded,
    hf_logits,
    hf_logits_incremental,
    load_hf,
    sample_ids,
)

ONE_PER_FAMILY = [
    "neox-parallel-rot25",
    "falcon-40b-newarch-ln2",
    "llama-gqa-tied",
    "mistral-gqa-sw8",
]


def _saved_keys(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def _assert_config_kept(case: Case, saved: dict[str, Any]) -> None:
    for key, want in case.config_kwargs.items():
        assert key in saved, f"{case.id}: {key} missing from config.json"
        if key == "rope_parameters":
            for rk, rv in want.items():
                assert saved[key].get(rk) == rv, f"{case.id}: rope_parameters[{rk}]"
        else:
            assert saved[key] == want, f"{case.id}: {key}={saved[key]!r}, want {want!r}"


def test_cases_cover_every_family() -> None:
    assert {c.family for c in CASES} == set(FAMILIES)
    assert len(CASES_BY_ID) == len(CASES)
    for fam in FAMILIES:
        assert sum(c.family == fam for c in CASES) >= 3, fam
    rope_types = {
        c.config_kwargs["rope_parameters"]["rope_type"] for c in CASES if c.family == "llama"
    }
    assert {"linear", "dynamic", "yarn", "llama3", "longrope"} <= rope_types
    for c in CASES:
        scaled = c.config_kwargs["rope_parameters"]["rope_type"] != "default"
        assert c.beyond_context == scaled, c.id


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_builds_and_runs(case: Case, tmp_path: Path) -> None:
    out = build(case, tmp_path / case.id)
    assert out == tmp_path / case.id
    assert (out / "config.json").is_file()
    assert (out / "model.safetensors").is_file()

    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == case.family
    assert saved["dtype"] == "float32"
    _assert_config_kept(case, saved)

    tensors = _saved_keys(out)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    head = "embed_out.weight" if case.family == "gpt_neox" else "lm_head.weight"
    assert (head in tensors) != case.tied, f"{case.id}: tied={case.tied} but keys {sorted(tensors)}"
    for name, t in tensors.items():  # nothing left at its trivial init
        assert t.std() > 0.01, name
        if name.endswith("bias"):
            assert t.abs().mean() > 0.02, name
        if "norm" in name or "ln_" in name:
            assert not torch.allclose(t, torch.ones_like(t)), name

    n = case.test_length()
    assert n == (case.max_position_embeddings + 8 if case.beyond_context else 12)
    logits = hf_logits(out, sample_ids(case))
    assert logits.shape == (n, case.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # not degenerate
    assert not torch.allclose(logits[0], logits[-1])


def test_build_is_deterministic(tmp_path: Path) -> None:
    case = CASES_BY_ID["llama-bias"]
    a = _saved_keys(build(case, tmp_path / "a"))
    b = _saved_keys(build(case, tmp_path / "b"))
    c = _saved_keys(build(case, tmp_path / "c", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("case_id", ONE_PER_FAMILY)
def test_bin_and_sharded_match_safetensors(case_id: str, tmp_path: Path) -> None:
    case = CASES_BY_ID[case_id]
    ids = sample_ids(case)
    ref = hf_logits(build(case, tmp_path / "st"), ids)

    bin_dir = build_bin(case, tmp_path / "bin")
    assert (bin_dir / "pytorch_model.bin").is_file()
    assert not list(bin_dir.glob("*.safetensors"))
    assert torch.equal(hf_logits(bin_dir, ids), ref)

    legacy = build_bin(case, tmp_path / "legacy", legacy_buffers=True)
    state = torch.load(legacy / "pytorch_model.bin", weights_only=True)
    if case.family != "falcon":
        assert any(k.endswith("rotary_emb.inv_freq") for k in state)
    assert torch.equal(hf_logits(legacy, ids), ref)

    sh = build_sharded(case, tmp_path / "sh")
    index = json.loads((sh / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((sh / s).is_file() for s in shards)
    assert not (sh / "model.safetensors").exists()
    assert torch.equal(hf_logits(sh, ids), ref)


def test_sliding_window_is_exercised(tmp_path: Path) -> None:
    case = CASES_BY_ID["mistral-gqa-sw8"]
    assert case.config_kwargs["sliding_window"] < case.test_length()
    out = build(case, tmp_path / case.id)
    ids = sample_ids(case)
    model = load_hf(out)
    model.config.sliding_window = None
    with torch.no_grad():
        full = model(torch.tensor([ids]), use_cache=False).logits[0]
    windowed = hf_logits(out, ids)
    w = case.config_kwargs["sliding_window"]
    torch.testing.assert_close(windowed[:w], full[:w], rtol=1e-5, atol=1e-5)
    assert (windowed[w:] - full[w:]).abs().max() > 1e-2


def test_incremental_matches_full_forward_except_dynamic(tmp_path: Path) -> None:
    plain = CASES_BY_ID["llama-gqa-tied"]
    out = build(plain, tmp_path / plain.id)
    ids = sample_ids(plain)
    torch.testing.assert_close(
        hf_logits_incremental(out, ids, prefill=3), hf_logits(out, ids), rtol=1e-4, atol=1e-4
    )

    dyn = CASES_BY_ID["llama-rope-dynamic"]
    out = build(dyn, tmp_path / dyn.id)
    ids = sample_ids(dyn)
    full = hf_logits(out, ids)
    inc = hf_logits_incremental(out, ids, prefill=3)
    n = dyn.max_position_embeddings
    # Up to max_position_embeddings the incremental run uses the original frequencies, whereas the
    # full forward over len(ids) > max_pos rescales the base for every position.
    assert (inc[:n] - full[:n]).abs().max() > 1e-3
    torch.testing.assert_close(inc[:n], hf_logits(out, ids[:n]), rtol=1e-4, atol=1e-4)
