"""Typed exceptions raised by the library.

The library raises these (chained with `from` where there is a cause); the CLI edge turns
each one into a single readable sentence and an exit code. Nothing here imports torch.
"""

from __future__ import annotations

import errno


class ParrotError(Exception):
    """Base class: a failure the user can act on. `str(err)` is the sentence to show."""

    exit_code: int = 1


class UsageError(ParrotError):
    """An impossible combination of options or an invalid value (exit code 2)."""

    exit_code = 2


class ModelNotFoundError(ParrotError):
    """No checkpoint at the given path or name; the message names the command that fetches it."""


class CheckpointError(ParrotError):
    """A checkpoint or source file is missing parts, truncated or corrupt."""


class ConfigError(CheckpointError):
    """An architecture config that is malformed, inconsistent or out of bounds: its message
    says which value and why; readers prefix the file it came from."""


class UnsupportedArchitectureError(ParrotError):
    """The model's architecture is not one parrot implements."""


class ContextLengthError(ParrotError):
    """A prompt (plus what must be generated) does not fit the model's context window."""


class OutOfMemoryError(ParrotError):
    """The device ran out of memory."""


class DiskFullError(ParrotError):
    """Not enough free disk space for a download or a checkpoint (the message has the numbers)."""


class NotSupportedError(ParrotError):
    """A feature parrot does not implement yet."""


class DistributedError(ParrotError):
    """A rank of a multi-device world failed, died or stopped answering; the others stop."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is a failed allocation, whatever raised it: MemoryError (Python),
    torch's OutOfMemoryError (CUDA), the CPU allocator's RuntimeError ("can't allocate
    memory"), or an mmap the address-space limit refused (ENOMEM)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    if isinstance(err, OSError) and err.errno == errno.ENOMEM:
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text)
