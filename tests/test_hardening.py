"""Hostile input as a new user meets it: a chat template or a pickle that tries to run code,
configs that disagree with their weights or ask for absurd sizes, and models or caches larger
than the memory the process may use. Each must end in one sentence and exit 1, with the
payload never run, nothing half-written left behind, and nothing allocated first.

The fuzz suite (tests/fuzz, run by tests/test_fuzz.py) covers the same readers with
generated input; these are the cases a person would try, end to end."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jinja2
import pytest
import torch

from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.store import _write_safetensors
from parrot_cli.errors import CheckpointError, ConfigError
from parrot_cli.tokenizer import ChatTemplateError, Tokenizer
from tests.conftest import run_parrot
from tests.test_cli import assert_one_line_error
from tests.test_gguf import TinySpec, write_tiny_gguf

TINY_LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "eos_token_id": 2, "bos_token_id": 1}


def hf_llama_weights(config: dict) -> list[tuple[str, torch.Tensor]]:
    """A tiny Llama's weights in Hugging Face naming, shaped by `config`."""
    c = config
    h, ffn, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = h // heads
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (heads * hd, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                   p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, heads * hd),
                   p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                   p + "mlp.down_proj.weight": (h, ffn)}
    return [(n, torch.randn(s, generator=g)) for n, s in shapes.items()]


def hf_dir(path: Path, config: dict, weights_config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    _write_safetensors(path / "model.safetensors", hf_llama_weights(weights_config or config))
    return path


# ------------------------------------------------------------------ chat templates run no code

def marker_payloads(marker: Path) -> list[str]:
    """Templates that create `marker` when rendered by a plain (unsandboxed) jinja2: each
    reaches `os` through a different door."""
    templates = [
        "{{ cycler.__init__.__globals__.os.system(CMD) }}",
        "{{ joiner.__init__.__globals__['os'].popen(CMD).read() }}",
        "{{ namespace.__init__.__globals__.os.system(CMD) }}",
        "{{ lipsum.__globals__['os'].system(CMD) }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
        "{{ c()._module.__builtins__['__import__']('os').system(CMD) }}{% endif %}{% endfor %}",
        "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system(CMD) }}",
    ]
    return [t.replace("CMD", f"'touch {marker}'") for t in templates]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint's tokenizer files (from a tiny GGUF conversion)."""
    gguf_path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(gguf_path, TinySpec(n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, ffn=128))
    return convert(gguf_path, tmp_path_factory.mktemp("ckpt") / "tiny", dtype="float32")


def test_a_template_that_reaches_for_python_runs_no_code(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    messages = [{"role": "user", "content": "hi"}]
    for index, source in enumerate(marker_payloads(tmp_path / "x")):
        # The payload is live: plain jinja2 runs it and the marker appears.
        control = tmp_path / f"control{index}"
        jinja2.Environment().from_string(source.replace(str(tmp_path / "x"), str(control))).render(messages=messages)
        assert control.exists(), f"payload {index} is not live, the test would prove nothing"
        # In parrot's sandbox it is refused in one sentence and never runs.
        marker = tmp_path / f"marker{index}"
        tok.chat_template = source.replace(str(tmp_path / "x"), str(marker))
        with pytest.raises(ChatTemplateError) as caught:
            tok.apply_chat_template(messages)
        message = str(caught.value)
        assert "\n" not in message and ("sandbox forbids" in message or "undefined" in message), message
        assert not marker.exists(), f"payload {index} ran"


def test_templates_that_spin_or_blow_up_are_stopped(tiny_tokenizer_dir: Path, monkeypatch) -> None:
    from parrot_cli import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    monkeypatch.setattr(chat_template, "RENDER_MEMORY_BYTES", 64 * 1024**2)
    tok = Tokenizer.from_dir(tiny_tokenizer_dir)
    cases = {
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "took more than 1 s",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "used more than 64 MB",
        "{{ 'x' * 10**10 }}": "a repeated value of 10000000000",
        "{{ '{:>999999999}'.format(1) }}": "format width",
        "{{ 'a' | center(10**10) }}": "argument of 10000000000",
        "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}": "past",
    }
    for source, expected in cases.items():
        # The memory case gets time enough that its own limit, not the clock, stops it
        # (on a loaded machine the doubling may take over a second to reach 64 MB).
        monkeypatch.setattr(chat_template, "RENDER_SECONDS", 20.0 if "MB" in expected else 1.0)
        tok.chat_template = source
        started = time.monotonic()
        with pytest.raises(ChatTemplateError, match="stopped") as caught:
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
        assert expected in str(caught.value), str(caught.value)
        assert time.monotonic() - started < 30


def test_template_memory_allowance_holds_after_a_high_peak(monkeypatch) -> None:
    """The allowance is measured on the resident size now, not the process's peak: after a
    big allocation is freed (a model loaded and dropped, a long test run), a render may still
    grow only RENDER_MEMORY_BYTES, not the old peak plus that."""
    from parrot_cli import chat_template

    if not sys.platform.startswith("linux"):
        pytest.skip("the current resident size is read from /proc")
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 60.0)
    monkeypatch.setattr(chat_template, "RENDER_MEMORY_BYTES", 64 * 1024**2)
    spike = bytearray(512 * 1024**2)  # touched pages: the peak goes up by 512 MB
    spike[:: resource.getpagesize()] = b"x" * len(range(0, len(spike), resource.getpagesize()))
    del spike  # a large bytearray is unmapped on free: resident memory comes back down
    chunks: list[bytes] = []

    def grow() -> None:  # a frame of its own: the limits trace the frames called under them
        while len(chunks) < 1024:
            chunks.append(b"y" * 1024**2)

    with pytest.raises(chat_template._LimitExceeded, match="used more than 64 MB"):
        with chat_template._limits():
            grow()
    grown = len(chunks)
    chunks.clear()
    assert 32 <= grown <= 128, f"stopped after {grown} MB, allowance 64 MB"


# ------------------------------------------------------------------ pickles run no code

class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_a_code_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    source = tmp_path / "evil"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(TINY_LLAMA))
    marker = tmp_path / "pwned"
    weights = dict(hf_llama_weights(TINY_LLAMA))
    torch.save({**weights, "model.payload": _Payload(marker)}, source / "pytorch_model.bin")
    # The payload is live: an unsafe load runs it.
    control = tmp_path / "control.bin"
    torch.save({"x": _Payload(tmp_path / "control")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control").exists()

    result = run_parrot("convert", str(source), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, 1, "Refused to load", "posix.system", "weights_only=True")
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_legacy_pickles_still_convert(tmp_path: Path) -> None:
    """Pre-zip torch.save files cannot be memory-mapped; they are read (still weights-only)."""
    source = tmp_path / "legacy"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(TINY_LLAMA))
    weights = dict(hf_llama_weights(TINY_LLAMA))
    torch.save(weights, source / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError, match="mmap can only be used"):  # why the fallback exists
        torch.load(source / "pytorch_model.bin", weights_only=True, mmap=True)
    out = convert(source, tmp_path / "out")
    from parrot_cli.checkpoint.store import load_weights

    assert torch.equal(load_weights(out)["transformer.wte.weight"], weights["model.embed_tokens.weight"])


# ------------------------------------------------------------------ configs against their weights

def test_config_json_that_disagrees_with_its_weights_does_not_convert(tmp_path: Path) -> None:
    zero_heads = hf_dir(tmp_path / "zero", {**TINY_LLAMA, "num_attention_heads": 0}, TINY_LLAMA)
    result = run_parrot("convert", str(zero_heads), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, 1, "config.json is invalid", "num_attention_heads is 0")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    # Sizes that are each fine but disagree with the weights: caught tensor by tensor.
    for key, value, tensor in (("intermediate_size", 40, "mlp.fc.weight"), ("num_key_value_heads", 4, "attn.qkv.weight"),
                               ("vocab_size", 65, "wte.weight")):
        source = hf_dir(tmp_path / key, {**TINY_LLAMA, key: value}, TINY_LLAMA)
        with pytest.raises(CheckpointError, match=rf"do not match the config's sizes: \S*{tensor} is") as caught:
            convert(source, tmp_path / "out")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_absurd_layer_counts_fail_at_once(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from parrot_cli import LLM

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    saved = json.loads((ckpt / "parrot_config.json").read_text())

    def with_layers(n: int) -> None:
        (ckpt / "parrot_config.json").write_text(json.dumps({**saved, "config": {**saved["config"], "n_layer": n}}))

    with_layers(1000)  # within bounds, but the weights hold 2
    with pytest.raises(CheckpointError, match="the config has 1000 layers but the weights hold 2"):
        LLM.load(ckpt, device="cpu")
    with_layers(10**9)  # used to build a model for ever
    started = time.monotonic()
    result = run_parrot("generate", "Hi", "--checkpoint-dir", str(ckpt), "--max-new-tokens", "2", timeout=120)
    assert_one_line_error(result, 1, "parrot_config.json is invalid", "n_layer (the number of layers) is 1000000000")
    assert time.monotonic() - started < 120
    with pytest.raises(ConfigError, match="head"):
        with_layers(2)
        data = json.loads((ckpt / "parrot_config.json").read_text())
        data["config"]["n_head"] = 0
        (ckpt / "parrot_config.json").write_text(json.dumps(data))
        LLM.load(ckpt, device="cpu")


# ------------------------------------------------------------------ more memory than there is

def _address_space_after_import() -> int:
    code = ("import parrot_cli.api, parrot_cli.cli\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip()) * 1024


def _run_limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    """`parrot ARGS` with an address-space limit (RLIMIT_AS): what a smaller machine allows."""
    import signal

    def limit_child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "parrot_cli", *args], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_child)


@pytest.mark.smollm2
def test_a_model_or_cache_larger_than_memory_is_one_clear_error(smollm2_checkpoint: Path, tmp_path: Path,
                                                                 tiny_tokenizer_dir: Path) -> None:
    base = _address_space_after_import()
    # SmolLM2 in float32 maps 538 MB: 300 MB of room cannot hold it.
    model = _run_limited(base + 300 * 1024**2, "generate", "Hi", "--checkpoint-dir", str(smollm2_checkpoint),
                         "--max-new-tokens", "2", "--precision", "32-true")
    assert_one_line_error(model, 1, "Out of memory loading", "--quantize")

    # A tiny model with a long context: the model loads, its 2 GB KV cache is refused first.
    ckpt = tmp_path / "long"
    ckpt.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    data = json.loads((ckpt / "parrot_config.json").read_text())
    data["config"]["block_size"] = 1 << 23
    (ckpt / "parrot_config.json").write_text(json.dumps(data))
    cache = _run_limited(base + 600 * 1024**2, "generate", "Hi", "--checkpoint-dir", str(ckpt),
                         "--max-new-tokens", "2", "--max-seq-length", str(1 << 23), "--precision", "32-true")
    assert_one_line_error(cache, 1, f"A KV cache of {1 << 23} tokens needs", "available", "--max-seq-length")
