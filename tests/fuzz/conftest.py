"""Property-based fuzzing of every reader of untrusted files (hypothesis).

Each test feeds one reader mutated or generated input and asserts the only outcomes are a
result or a `ParrotError` whose message is one line: never another exception, a hang or an
unbounded allocation. Three guards make the last two show up as failures, not slow passes:

- the whole run is under an address-space limit (RLIMIT_AS, `PARROT_FUZZ_RLIMIT_AS`
  bytes, default 4 GiB): an attempt to allocate gigabytes raises MemoryError (a failure)
  instead of quietly succeeding on a big machine;
- `faulthandler` kills the run with a traceback when one case takes longer than
  `PARROT_FUZZ_CASE_TIMEOUT` seconds (default 20): a hang, wherever it is (even in Rust);
- hypothesis shrinks a failing case to a small reproducer.

Profiles (`PARROT_FUZZ=ci|long`): `ci` is fast and derandomized (the same cases every run,
so CI is reproducible), `long` runs 10,000 random cases per reader (`make fuzz`). The
counts and outcomes per reader are printed at the end, and written as JSON to
`PARROT_FUZZ_REPORT` when set.

This directory is not collected by the main test run (`tests/conftest.py` ignores it):
`tests/test_fuzz.py` runs it in a child process, so the limit never touches other tests.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings

from parrot_cli.errors import ParrotError, is_out_of_memory

T = TypeVar("T")

PROFILE = os.environ.get("PARROT_FUZZ", "ci")
CASE_TIMEOUT = float(os.environ.get("PARROT_FUZZ_CASE_TIMEOUT", "20"))
ADDRESS_SPACE = int(os.environ.get("PARROT_FUZZ_RLIMIT_AS", str(4 * 1024**3)))
LONG_EXAMPLES = int(os.environ.get("PARROT_FUZZ_EXAMPLES", "10000"))

_common = dict(
    deadline=None,  # a shared 2-core machine makes per-case deadlines flaky; faulthandler guards hangs
    database=None,  # no .hypothesis directory in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
    # No "explain" phase: its line tracer slows every case several-fold, and the chat
    # template deadline installs a tracer of its own.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
settings.register_profile("ci", derandomize=True, **_common)
settings.register_profile("long", max_examples=LONG_EXAMPLES, **_common)
settings.load_profile(PROFILE)


def examples(ci: int) -> Any:
    """Per-reader case budget: `ci` cases in the CI profile, the profile's count otherwise.
    (A decorator: `@examples(200)` under `@given`.)"""
    if PROFILE == "ci":
        return settings(max_examples=ci)
    return settings(max_examples=LONG_EXAMPLES)


# ------------------------------------------------------------------ outcome accounting

OUTCOMES: dict[str, Counter[str]] = defaultdict(Counter)


def clean(reader: str, call: Callable[[], T]) -> T | None:
    """Run one fuzz case: the result, or None after a ParrotError of one readable line.
    Any other exception propagates (a failure hypothesis then shrinks). Counts the outcome
    under `reader` for the report."""
    faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
    try:
        result = call()
    except ParrotError as err:
        message = str(err)
        assert message and "\n" not in message, f"not one line: {message!r}"
        assert "Traceback" not in message
        # A clean error that was really a failed allocation hides the bug we look for.
        cause: BaseException | None = err
        while cause is not None:
            assert not is_out_of_memory(cause), f"an allocation failed under the limit: {cause!r}"
            cause = cause.__cause__ or cause.__context__
        OUTCOMES[reader][type(err).__name__] += 1
        return None
    finally:
        faulthandler.cancel_dump_traceback_later()
    OUTCOMES[reader]["ok"] += 1
    return result


# ------------------------------------------------------------------ the address-space limit


def pytest_configure(config: pytest.Config) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = ADDRESS_SPACE if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not OUTCOMES:
        return
    write = terminalreporter.write_line
    write(f"fuzz cases per reader (profile {PROFILE}, RLIMIT_AS {ADDRESS_SPACE / 1024**3:.1f} GiB):")
    for reader in sorted(OUTCOMES):
        counts = OUTCOMES[reader]
        detail = ", ".join(f"{k} {v}" for k, v in counts.most_common())
        write(f"  {reader}: {sum(counts.values())} ({detail})")
    path = os.environ.get("PARROT_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"profile": PROFILE, "readers": {k: dict(v) for k, v in OUTCOMES.items()}}, f, indent=2)

