"""The lock (constraints.txt) that `make install` and CI install from agrees with pyproject.

pyproject.toml keeps ranges for library users; constraints.txt pins one version of
everything. These checks fail when the two drift apart (a dependency added or a range
changed without `make lock`), and when the lock would pull a CUDA torch."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).parent.parent
# The extras `make install` installs (bnb and peers are subsets of test; llamacpp builds
# from source and is not installed).
LOCKED_EXTRAS = ("test",)


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for e in LOCKED_EXTRAS for s in project["optional-dependencies"][e])]
    return [r for r in map(Requirement, specs) if r.marker is None or r.marker.evaluate({"extra": ""})]


def test_lock_pins_every_requirement_within_its_range():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: run `make lock`"
        )


def test_lock_pins_the_cpu_torch_and_no_cuda_packages():
    pins = _pins()
    makefile_torch = re.search(r"^TORCH \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch and pins["torch"] == Version(makefile_torch[1]), "the lock's torch is the Makefile's"
    assert not [name for name in pins if name.startswith("nvidia-")], "a CUDA torch got into the lock"
