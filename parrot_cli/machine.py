"""What `parrot bench` records about the machine it runs on: its read bandwidth (the
decode bound), a description of the device and software, and peak memory per
configuration (the kernel's RSS high-water mark reset before each load, or the CUDA
allocator's peak)."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from parrot_cli import __version__

BANDWIDTH_PROBE_BYTES = 512 * 1024**2  # large enough to defeat every cache level


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 halves
    the bytes read per token and its matmuls are fast; elsewhere bf16 is emulated and slower
    than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

def measure_read_bandwidth(device: str = "cpu", size: int = BANDWIDTH_PROBE_BYTES) -> float:
    """Best-of-5 GB/s of `.sum()` over a float32 tensor of `size` bytes, with all threads:
    the read bandwidth a decode step can hope for on this machine."""
    import torch

    dev = torch.device(device)
    x = torch.ones(size // 4, dtype=torch.float32, device=dev)
    best = math.inf
    for i in range(6):
        _sync(dev)
        start = time.perf_counter()
        x.sum()
        _sync(dev)
        if i:  # the first pass faults the pages in
            best = min(best, time.perf_counter() - start)
    del x
    return size / best / 1e9


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def environment(device: str) -> dict[str, Any]:
    """What a reader needs to know about where the numbers come from."""
    import torch

    dev = torch.device(device)
    env: dict[str, Any] = {
        "device": device,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parrot": __version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    """The commit parrot runs from (with -dirty for local changes), when it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class PeakMemory:
    """Peak memory of one configuration. CUDA: the allocator's max allocated since reset.
    CPU: the kernel's RSS high-water mark, reset through /proc/self/clear_refs; where that
    is unavailable, the process-lifetime peak (ru_maxrss), and `method` says so."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.method = "cuda-max-allocated"
        elif _reset_hwm():
            self.method = "rss-peak"
        else:
            self.method = "rss-peak-process-lifetime"

    def reset(self) -> int:
        """Forget the previous peak; return the memory in use now (the baseline)."""
        import psutil
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        malloc_trim()
        _reset_hwm()
        return psutil.Process().memory_info().rss

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.method == "rss-peak":
            match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            if match:
                return int(match.group(1)) * 1024
        from parrot_cli.api import peak_memory_bytes

        return peak_memory_bytes(self.device)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak RSS (Linux >= 4.0)
        return Path("/proc/self/status").read_text().find("VmHWM") >= 0
    except OSError:
        return False


def malloc_trim() -> None:
    """Give freed heap back to the OS (glibc keeps freed memory otherwise): between bench
    configurations, so one's leftovers do not count in the next one's peak, and between
    blocks while a model loads."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
STREAMING_MMAP_THRESHOLD = 1 << 20
STEADY_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its moving threshold (64-bit)


@contextmanager
def big_blocks_mapped() -> Iterator[None]:
    """While a checkpoint streams tensor by tensor, serve every allocation of 1 MB or more
    by its own mapping, returned to the OS when freed.

    glibc otherwise raises its mapping threshold after the first large free, and the
    converter's per-chunk temporaries then fragment the heap: converting SmolLM2's int8
    embedding in 2M-element chunks grew the process by ~260 MB for a 28 MB result (with
    this, by ~90 MB). Afterwards the threshold is left at glibc's own ceiling, where its
    moving threshold ends up anyway, so later work in the process keeps heap reuse."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        yield
        return
    mallopt(M_MMAP_THRESHOLD, STREAMING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
