"""How much memory and disk an operation may use, checked before it allocates or writes.

A header, a config or a flag can ask for gigabytes; parrot compares what an operation needs
with what the machine (and the process's limits) can give before it starts, and refuses
with both numbers. What the check cannot foresee (another process filling the disk, memory
fragmentation) is caught where it fails and told in the same words. No torch import here.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path

from parrot_cli.errors import DiskFullError, OutOfMemoryError


def human_bytes(n: float) -> str:
    """1_500_000_000 -> '1.5 GB' (decimal units, as disks and downloads are sold)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


# --------------------------------------------------------------------------- memory


def memory_available() -> int:
    """Bytes this process can still allocate: the machine's available memory, capped by
    the room left under an address-space limit (RLIMIT_AS) when one is set."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except (ImportError, OSError):
        available = 1 << 62
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        available = min(available, max(soft - _address_space_used(), 0))
    return available


def _address_space_used() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def check_memory(need: int, what: str, advice: str) -> None:
    """Refuse, before allocating, an operation that needs more memory than is available:
    `what` needs `need` bytes; `advice` is the fix ("lower --max-seq-length")."""
    available = memory_available()
    if need > available:
        raise OutOfMemoryError(
            f"{what} needs {human_bytes(need)} of memory but only {human_bytes(available)} is available; {advice}."
        )


# --------------------------------------------------------------------------- disk


def disk_free(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(path: Path, need: int, what: str) -> None:
    """Refuse, before writing, an operation that needs more space than `path`'s disk has."""
    free = disk_free(path)
    if need > free:
        raise DiskFullError(
            f"{what} needs {human_bytes(need)} of disk space but {mount_of(path)} has only "
            f"{human_bytes(free)} free; free some space or choose another place."
        )


def is_disk_full(err: BaseException) -> bool:
    """A write failed for lack of space: the disk is full (ENOSPC), the quota is spent
    (EDQUOT), or the file-size limit (RLIMIT_FSIZE) was reached (EFBIG)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_error(path: Path, need: int, what: str) -> DiskFullError:
    """The error for a write that ran out of space midway (everything written was removed)."""
    return DiskFullError(
        f"The disk filled up while {what}: it needs {human_bytes(need)} in all and {mount_of(path)} "
        f"has {human_bytes(disk_free(path))} free now; nothing was left half-written, free some "
        "space and run the command again."
    )


def mount_of(path: Path) -> str:
    """The mount point holding `path`: the place to free space on."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)
