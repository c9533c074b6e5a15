"""Calibration text for GPTQ: the token windows a model is run on while it is quantized.

A user's file (`--calibration FILE`: plain text, or JSON Lines with a "text" field per
line when the name ends in .jsonl/.ndjson) or, without one, a default that every machine
has offline: the Python standard library's own documentation (the Language Reference
topics of `pydoc_data`, then module, class and function docstrings of the stdlib in path
order). The hub's usual wikitext/C4 need a network; this text is English prose about code,
deterministic for a given Python version, and recorded by sha256 in the checkpoint.

The text is tokenized once and cut into non-overlapping windows of `seq_len` tokens; when
it holds more windows than asked for, `samples` of them are taken evenly spread over the
whole text (a file sorted by topic still calibrates on all of it). Each window starts with
the model's BOS token when its tokenizer adds one to prompts, as generation will see.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from parrot_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from parrot_cli.tokenizer import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_SOURCE = "python-docs"
# stdlib directories whose docstrings are not documentation prose (or duplicate the topics)
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
              "turtledemo", "ensurepip", "pydoc_data", "__pycache__"}


@dataclass
class Calibration:
    """The windows [samples, seq_len] (int64) and where they came from."""

    windows: torch.Tensor
    source: str  # a file path, or "python-docs"
    sha256: str  # of the text the windows were cut from
    tokens: int  # of that text
    note: str | None = None  # e.g. fewer samples than asked for

    @property
    def samples(self) -> int:
        return self.windows.size(0)

    @property
    def seq_len(self) -> int:
        return self.windows.size(1)

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "text_tokens": self.tokens,
                "samples": self.samples, "seq_len": self.seq_len}


def calibration_windows(
    tokenizer: Tokenizer, samples: int, seq_len: int, path: Path | None = None
) -> Calibration:
    """`samples` windows of `seq_len` tokens from the file at `path` (or the default text).
    A text with fewer windows than asked for gives all it has, with a note; one shorter
    than a single window is a usage error."""
    import torch

    if samples < 1 or seq_len < 2:
        raise UsageError("--samples must be at least 1 and --seq-len at least 2.")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    body = seq_len - (bos is not None)
    if path is not None:
        text, source = read_calibration_file(Path(path)), str(path)
    else:
        text, source = default_text(tokenizer, samples * body), DEFAULT_SOURCE
    ids = tokenizer.encode(text, bos=False)
    available = len(ids) // body
    if available == 0:
        raise UsageError(
            f"The calibration text {source} has {len(ids)} tokens, fewer than one window of "
            f"--seq-len {seq_len}; give a longer --calibration file or a smaller --seq-len."
        )
    note = None
    if available < samples:
        note = (f"The calibration text {source} holds {available} windows of {seq_len} tokens; "
                f"calibrating on {available} samples instead of {samples}.")
        samples = available
    starts = [(i * available // samples) * body for i in range(samples)]
    rows = [ids[s : s + body] for s in starts]
    if bos is not None:
        rows = [[bos, *row] for row in rows]
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Calibration(torch.tensor(rows, dtype=torch.long), source, digest, len(ids), note)


def read_calibration_file(path: Path) -> str:
    """The text of a calibration file: plain UTF-8 text, or JSON Lines whose objects each
    carry a "text" string (records are joined by blank lines)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"The calibration file {path} does not exist.") from None
    except IsADirectoryError:
        raise UsageError(f"The calibration file {path} is a directory, not a text file.") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"The calibration file {path} is not UTF-8 text ({err.reason}).") from None
    if path.suffix.lower() not in JSONL_SUFFIXES:
        if not raw.strip():
            raise UsageError(f"The calibration file {path} is empty.")
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"{path} line {number} is not valid JSON.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path} line {number} has no \"text\" string.")
        texts.append(record["text"])
    if not texts:
        raise UsageError(f"The calibration file {path} has no records.")
    return "\n\n".join(texts)


def default_text(tokenizer: Tokenizer, min_tokens: int) -> str:
    """The offline default: stdlib documentation in a fixed order, until it holds at least
    `min_tokens` tokens (or all of it). Only as much is read as needed: all of it (about
    half a million tokens) takes ~10 s to parse."""
    parts, total = [], 0
    for doc in _stdlib_documents():
        parts.append(doc)
        total += len(tokenizer.encode(doc + "\n\n", bos=False))
        if total >= min_tokens * 1.02:  # a margin: the joined text tokenizes a little differently
            break
    return "\n\n".join(parts)


def _stdlib_documents() -> Iterator[str]:
    """The Language Reference topics (sorted by name), then every docstring of the stdlib's
    Python files in path order (read with `ast`, nothing imported)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if set(path.relative_to(root).parts) & _SKIP_DIRS:
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:  # one-line docstrings are mostly names
                    yield doc
