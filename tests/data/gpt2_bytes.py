"""GPT-2's printable spelling of the 256 bytes, written out independently of parrot's own
(checkpoint/gguf.py) so tests check it rather than repeat it. Standard library only: the
fixture script imports it from llama.cpp's venv, where parrot is not installed."""

from __future__ import annotations


def gpt2_byte_alphabet() -> list[str]:
    """Bytes 0..255 as byte-level BPE vocabularies spell them: printable Latin-1 bytes as
    themselves, the rest shifted to chr(256 + i) in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]
