"""Turning what a user typed (a path, an `org/name`, an alias, or nothing) into a
checkpoint directory, with an error that says how to get a model that is missing."""

from __future__ import annotations

from pathlib import Path

from parrot_cli.checkpoint.info import CONFIG_FILE
from parrot_cli.config import DEFAULT_MODELS, KNOWN_MODELS, KnownModel, find_known
from parrot_cli.errors import ModelNotFoundError
from parrot_cli.paths import checkpoints_root


def fetch_hint(model: KnownModel) -> str:
    # Every registry name is a hub id or has a fetchable source: `parrot download` gets it.
    return f"get it with `parrot download {model.aliases[0] if model.aliases else model.name}`"


def locate(model: str | None) -> Path:
    """The checkpoint directory for `model` (None = the default model)."""
    if model is None:
        for name in DEFAULT_MODELS:
            path = checkpoints_root() / name
            if (path / CONFIG_FILE).is_file():
                return path
        fallback = KNOWN_MODELS[DEFAULT_MODELS[-1]]
        raise ModelNotFoundError(
            f"The default model (SmolLM2-135M-Instruct) is not on this machine; {fetch_hint(fallback)}."
        )
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    known = find_known(model)
    if known is not None:
        target = checkpoints_root() / known.name
        if (target / CONFIG_FILE).is_file():
            return target
        raise ModelNotFoundError(f"{known.name} is not on this machine; {fetch_hint(known)}.")
    under_root = checkpoints_root() / model
    if (under_root / CONFIG_FILE).is_file():
        return under_root
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a checkpoint directory; convert it with `parrot convert {path}`.")
    raise ModelNotFoundError(
        f"No checkpoint at {model}, and it is not a known model name "
        f"(`parrot convert SOURCE` creates a checkpoint)."
    )
