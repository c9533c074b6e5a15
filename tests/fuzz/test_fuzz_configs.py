"""Configs: parrot_config.json (`read_info` -> `Config.from_dict`), a Hugging Face
config.json (`Config.from_hf`, and `parrot convert` of a real weight file under it) and
generation_config.json (convert's normalisation, the settings it feeds, sampling). A config
that passes validation must be usable: the model builds (on the meta device), its RoPE
table computes, and a conversion either matches every weight or fails cleanly."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parrot_cli.checkpoint.info import CONFIG_FILE, read_info
from parrot_cli.config import KNOWN_MODELS, Config
from tests.fuzz.conftest import clean, examples
from tests.fuzz.test_fuzz_safetensors import json_value

EDGE = [0, 1, 2, 3, -1, -64, 7, 64, 2**31, 2**40, 2**62, 10**18, 0.5, 1e-12, 1e308, -0.0,
        math.inf, -math.inf, math.nan, True, False, None, "", "4", [], {}]
edge = st.one_of(st.sampled_from(EDGE), json_value)


def use(config: Config) -> None:
    """What loading does with a config before any weight is read."""
    from parrot_cli.model import GPT

    config.num_parameters()
    with torch.device("meta"):
        model = GPT(config)
    model.rope.build(4, torch.device("cpu"))
    model.rope(torch.arange(4), 4 * config.block_size if config.block_size < 2**20 else 4)


# ------------------------------------------------------------------ parrot_config.json

BASES = [m.config.to_dict() for m in KNOWN_MODELS.values()]


@st.composite
def parrot_config(draw: st.DrawFn) -> str:
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    data["n_layer"] = min(data["n_layer"], 2)  # keep the meta build quick
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from([*data, "rope_scaling"]))
        if key == "rope_scaling" and draw(st.booleans()):
            data[key] = draw(rope_scaling())
        elif draw(st.booleans()) and key in data:
            del data[key]
        else:
            data[key] = draw(edge)
    doc: Any = {"format_version": draw(st.sampled_from([1, 1, 1, 0, 2, "1", None])), "config": data}
    if draw(st.integers(0, 9)) == 0:
        doc = draw(json_value)
    text = json.dumps(doc)
    if draw(st.integers(0, 5)) == 0:
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "[" * 5000, "\x00", "\ud800", "}"])) + text[cut:]
    return text


@st.composite
def rope_scaling(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["linear", "dynamic", "yarn", "llama3", "longrope", "default", "su", 3]))
    scaling: dict[str, Any] = {"rope_type": kind}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "attention_factor", "beta_fast", "beta_slow", "short_factor", "long_factor", "mscale"):
        if draw(st.booleans()):
            scaling[key] = draw(st.one_of(st.floats(0.1, 64), st.lists(st.floats(0.5, 4), max_size=40), edge))
    return scaling


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("parrot-config-fuzz")


@given(text=parrot_config())
@examples(ci=300)
def test_parrot_configs_read_cleanly(checkpoint_dir: Path, text: str) -> None:
    (checkpoint_dir / CONFIG_FILE).write_text(text, encoding="utf-8", errors="surrogatepass")
    clean("parrot_config.json: read + model build", lambda: use(read_info(checkpoint_dir).config))


# ------------------------------------------------------------------ HF config.json

HF_BASES = [dict(m.hf_config) for m in KNOWN_MODELS.values()]
HF_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "intermediate_size", "max_position_embeddings", "head_dim", "rope_theta", "rope_scaling",
           "rope_parameters", "partial_rotary_factor", "rotary_pct", "rms_norm_eps", "layer_norm_eps",
           "hidden_act", "activation", "tie_word_embeddings", "eos_token_id", "bos_token_id", "model_type",
           "sliding_window", "num_kv_heads", "n_head", "ffn_hidden_size", "new_decoder_architecture",
           "multi_query", "alibi", "attention_bias", "mlp_bias", "bias", "use_parallel_residual",
           "num_ln_in_parallel_attn"]


@st.composite
def hf_config(draw: st.DrawFn) -> dict:
    data = copy.deepcopy(draw(st.sampled_from(HF_BASES)))
    data["num_hidden_layers"] = min(data["num_hidden_layers"], 2)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(HF_KEYS))
        if key in ("rope_scaling", "rope_parameters") and draw(st.booleans()):
            data[key] = draw(rope_scaling())
        elif draw(st.integers(0, 3)) == 0:
            data.pop(key, None)
        else:
            data[key] = draw(edge)
    return data


@given(hf=hf_config())
@examples(ci=300)
def test_hf_configs_read_cleanly(hf: dict) -> None:
    clean("HF config.json: from_hf + model build", lambda: use(Config.from_hf(hf, name="fuzz")))


TINY_LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "eos_token_id": 2, "bos_token_id": 1}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama in Hugging Face naming (weights written by parrot's own safetensors writer)."""
    from parrot_cli.checkpoint.store import _write_safetensors
    from tests.test_hardening import hf_llama_weights

    d = tmp_path_factory.mktemp("hf-llama")
    _write_safetensors(d / "model.safetensors", hf_llama_weights(TINY_LLAMA))
    return d


@st.composite
def tiny_llama_config(draw: st.DrawFn) -> dict:
    data = dict(TINY_LLAMA)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(TINY_LLAMA) + ["head_dim", "rope_scaling", "mlp_bias", "attention_bias"]))
        data[key] = draw(st.one_of(st.integers(0, 130), edge))
    return data


@given(hf=tiny_llama_config())
@examples(ci=80)
def test_convert_checks_weights_against_the_config(hf_dir: Path, tmp_path_factory, hf: dict) -> None:
    from parrot_cli.checkpoint.convert import convert

    (hf_dir / "config.json").write_text(json.dumps(hf))
    out = hf_dir.parent / "out"
    shutil.rmtree(out, ignore_errors=True)
    made = clean("HF config.json: convert of real weights", lambda: convert(hf_dir, out))
    if made is not None:  # a conversion that succeeds wrote weights of the config's shapes
        use(read_info(out).config)
        from parrot_cli.checkpoint.load import build_model

        build_model(read_info(out).config, out, torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------ generation_config.json

GEN_KEYS = ["eos_token_id", "bos_token_id", "pad_token_id", "temperature", "top_k", "top_p", "min_p",
            "repetition_penalty", "max_new_tokens", "do_sample"]


@st.composite
def generation_config(draw: st.DrawFn) -> str:
    data = {key: draw(st.one_of(st.sampled_from([0, 1, 2, 50, 0.7, 1.0]), edge))
            for key in draw(st.lists(st.sampled_from(GEN_KEYS), max_size=5, unique=True))}
    text = json.dumps(data)
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from(["[]", "null", "{", "[" * 10000, '"x"', text[: len(text) // 2]]))
    return text


def sample_with(directory: Path) -> None:
    """generation_config.json as `LLM.load` and a generation read it: convert's
    normalisation, the tokenizer's EOS/BOS, the sampling settings, one sampled token."""
    from parrot_cli.api import LLM
    from parrot_cli.checkpoint.convert import _generation_config
    from parrot_cli.checkpoint.info import read_json
    from parrot_cli.generation import sample
    from parrot_cli.settings import Settings

    config = KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"].config
    normalised = _generation_config(directory, config)
    dataclasses.replace(config, eos_token_id=normalised["eos_token_id"])  # what convert records
    settings = Settings(config={}).with_checkpoint(read_json(directory / "generation_config.json"))
    params, max_new, seed = LLM.sampling(types.SimpleNamespace(settings=settings))
    generator = torch.Generator().manual_seed(seed or 0)
    logits = torch.randn(64, generator=generator)
    sample(logits, params, generator, torch.tensor([1, 2, 3]))


@given(text=generation_config())
@examples(ci=300)
def test_generation_configs_read_cleanly(checkpoint_dir: Path, text: str) -> None:
    (checkpoint_dir / "generation_config.json").write_text(text)
    clean("generation_config.json: read + sampling", lambda: sample_with(checkpoint_dir))
