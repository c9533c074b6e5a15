"""The one settings resolver: flag > PARROT_* env > config.toml > checkpoint > default."""

from __future__ import annotations

import pytest

from parrot_cli.errors import UsageError
from parrot_cli.settings import SETTINGS, Settings, load_config_toml


def test_precedence(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('temperature = 0.3\ntop_k = 7\nmax_new_tokens = 11\nmodel = "smollm2-q4_1"\n')
    monkeypatch.setenv("PARROT_CONFIG", str(config))
    monkeypatch.setenv("PARROT_TOP_K", "5")
    checkpoint = {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 99, "repetition_penalty": 1.1}
    s = Settings(flags={"max_new_tokens": 3}).with_checkpoint(checkpoint)
    assert (s.get("max_new_tokens"), s.source("max_new_tokens")) == (3, "flag")
    assert (s.get("top_k"), s.source("top_k")) == (5, "env")
    assert (s.get("temperature"), s.source("temperature")) == (0.3, "config")
    assert (s.get("top_p"), s.source("top_p")) == (0.9, "checkpoint")
    assert (s.get("min_p"), s.source("min_p")) == (SETTINGS["min_p"].default, "default")
    assert s.get("model") == "smollm2-q4_1"
    # a checkpoint never sets what it does not own (the model, the device)
    assert Settings().with_checkpoint({"device": "cuda"}).get("device") == "auto"


def test_env_values_are_parsed_and_bad_ones_are_usage_errors(monkeypatch):
    monkeypatch.setenv("PARROT_COMPILE", "yes")
    monkeypatch.setenv("PARROT_SEED", "42")
    s = Settings(config={})
    assert s.get("compile") is True and s.get("seed") == 42
    monkeypatch.setenv("PARROT_TEMPERATURE", "hot")
    with pytest.raises(UsageError, match="PARROT_TEMPERATURE"):
        Settings(config={}).get("temperature")


def test_config_toml_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text("temperature = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        load_config_toml(bad)
    bad.write_text("temprature = 0.5\n")
    with pytest.raises(UsageError, match="unknown setting 'temprature'"):
        load_config_toml(bad)
    assert load_config_toml(tmp_path / "absent.toml") == {}


def test_llm_uses_checkpoint_generation_defaults(smollm2_checkpoint, tmp_path, monkeypatch):
    """The checkpoint's generation_config.json supplies defaults below env and flags."""
    import json
    import shutil

    from parrot_cli import LLM

    copy = tmp_path / "ckpt"
    shutil.copytree(smollm2_checkpoint, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": 3, "temperature": 0.0}))
    llm = LLM.load(copy, precision="32-true")
    stream = llm.stream("Hello, my name is")
    assert "".join(stream) == " Alex, and"
    assert stream.result.generated_tokens == 3
    monkeypatch.setenv("PARROT_MAX_NEW_TOKENS", "2")
    llm = LLM.load(copy, precision="32-true")
    assert llm.generate("Hello, my name is") == " Alex,"
    assert llm.generate("Hello, my name is", max_new_tokens=1) == " Alex"
