"""Runs the fuzz suite (tests/fuzz) in a child process under an address-space limit.

The child is the property-based fuzzing of every reader of untrusted files (GGUF,
safetensors, quantized weights and their config, parrot_config.json, config.json,
generation_config.json, tokenizer files, chat templates): its fast, derandomized `ci`
profile. The limit (RLIMIT_AS) applies to the child only, so an attempt to allocate
gigabytes fails there instead of slowing this machine; a hang is killed by the child's
per-case timeout. `make fuzz` runs the long profile (10,000 cases per reader) by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FUZZ_DIR = Path(__file__).parent / "fuzz"

# Every reader the suite covers, with the fewest cases the ci profile must have run.
READERS = {
    "gguf: mutated file, whole read path": 200,
    "gguf: generated header, validator": 200,
    "gguf: generated header, whole read path": 200,
    "safetensors: generated header, parser": 300,
    "safetensors: generated header, loader": 300,
    "safetensors: mutated file, loader": 200,
    "quantized weights: from_tensors + kernel + forward": 200,
    "quantization_config.json": 200,
    "parrot_config.json: read + model build": 200,
    "HF config.json: from_hf + model build": 200,
    "HF config.json: convert of real weights": 50,
    "generation_config.json: read + sampling": 200,
    "tokenizer files: load + encode/decode/stream": 150,
    "chat template: compile + render": 300,
}


def test_every_reader_fails_cleanly_on_fuzzed_input(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    env = {**os.environ, "PARROT_FUZZ": "ci", "PARROT_FUZZ_REPORT": str(report),
           "PARROT_HOME": str(tmp_path / "home")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(FUZZ_DIR)],
        capture_output=True, text=True, timeout=900, env=env, cwd=FUZZ_DIR.parent.parent,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    readers = json.loads(report.read_text())["readers"]
    ran = {name: sum(counts.values()) for name, counts in readers.items()}
    assert set(ran) == set(READERS), ran
    for name, least in READERS.items():
        assert ran[name] >= least, (name, readers[name])
        # The inputs were hostile: every reader refused some of them (with a clean error).
        assert set(readers[name]) - {"ok"}, (name, readers[name])
