"""Parrot: run large language models on your own machine.

`from parrot_cli import LLM` is the Python API. The import is lazy so that the CLI's
`--help` and shell completion never pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from parrot_cli.api import LLM

__all__ = ["LLM", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from parrot_cli.api import LLM

        return LLM
    raise AttributeError(f"module 'parrot_cli' has no attribute {name!r}")
