"""Where parrot keeps things. Each location can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def parrot_home() -> Path:
    """$PARROT_HOME, else the platform's user data dir (~/.local/share/parrot on Linux)."""
    env = os.environ.get("PARROT_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("parrot", appauthor=False))


def checkpoints_root() -> Path:
    env = os.environ.get("PARROT_CHECKPOINTS")
    return Path(env).expanduser() if env else parrot_home() / "checkpoints"


def cache_dir() -> Path:
    """Downloaded source files (wheels, GGUFs) kept between runs."""
    env = os.environ.get("PARROT_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("parrot", appauthor=False))


def config_file() -> Path:
    """The user's config.toml ($PARROT_CONFIG overrides the location)."""
    env = os.environ.get("PARROT_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("parrot", appauthor=False)) / "config.toml"
