"""Starting, joining and ending a world of ranks on torch.distributed.

Two ways in:
- parrot starts the world itself (`--devices N` without torchrun): this process is rank 0.
  It opens a TCPStore on 127.0.0.1 (port chosen by the OS), starts ranks 1..N-1 as
  `python -m parrot_cli.distributed.worker` with stdin and stdout on /dev/null, in their
  own session (Ctrl-C reaches rank 0 only, which stops the others), with the kernel told
  to kill each one if rank 0 dies (PR_SET_PDEATHSIG). Rank 0 knows their pids: when one
  dies it says which and how, and on exit it ends every one it started, by pid.
- torchrun (`RANK`, `WORLD_SIZE`, ... in the environment; any number of nodes): every rank
  joins with env://.

Each world has two process groups. The default one (gloo on CPU, nccl on GPU) carries the
model's collectives with a short timeout (`--dist-timeout`, 60 s): a rank that hangs ends
the others in seconds, not torch's default 30 minutes; a rank that dies is seen at once
(its sockets close). The control group (gloo) carries rank 0's commands, which wait as
long as the user takes to type the next chat message.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from parrot_cli.distributed.layout import Layout, torchrun_launch
from parrot_cli.errors import DistributedError, UsageError

WORKER_ENV = "PARROT_DIST_WORKER"  # JSON: how a started worker finds and joins its world
CONTROL_TIMEOUT = timedelta(days=30)
STARTUP_SECONDS = 120.0  # for the workers to import torch and check in (slow, loaded machines)
GRACE_SECONDS = 10.0  # for workers to leave after the exit command, before SIGTERM
PR_SET_PDEATHSIG = 1
_WORLDS = itertools.count()  # torchrun worlds this process has joined


@dataclass
class Workers:
    """The processes rank 0 started (ranks 1..N-1), and where each writes its errors."""

    procs: list[subprocess.Popen]
    logs: list[Path | None]
    tmpdir: Path | None = None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def failure(self, wait: float = 1.0) -> str | None:
        """One sentence about the first worker that has ended, or None if all live.
        Waits up to `wait` seconds for a dying worker to be reaped."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code is not None and code != 0:
                    return self._describe(rank, proc, code)
                if code == 0:
                    return f"Rank {rank} (pid {proc.pid}) left the world early."
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _describe(self, rank: int, proc: subprocess.Popen, code: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"Rank {rank} (pid {proc.pid}) was killed by {name}."
        said = self._last_line(rank)
        return f"Rank {rank} (pid {proc.pid}) failed: {said}" if said else (
            f"Rank {rank} (pid {proc.pid}) exited with code {code}."
        )

    def _last_line(self, rank: int) -> str | None:
        log = self.logs[rank - 1]
        if log is None or not log.is_file():
            return None
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else None

    def end(self, grace: float) -> None:
        """Wait up to `grace` seconds for every worker to exit, then SIGTERM, then SIGKILL:
        none outlives this call."""
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            alive = [p for p in self.procs if p.poll() is None]
            for proc in alive:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass
            for proc in alive:
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


@dataclass
class World:
    """This process's place in a world of ranks."""

    rank: int
    size: int
    local_rank: int
    device: torch.device  # where this rank computes
    backend: str
    timeout: float
    control: dist.ProcessGroup
    launcher: str  # "spawn" | "torchrun"
    workers: Workers | None = None  # on rank 0 of a world parrot started
    broken: bool = False  # a collective failed: the ranks are out of step
    threads_before: int = 0  # torch's threads before this rank took its share (restored on close)
    closed: bool = field(default=False, repr=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors for the default group's collectives live (nccl: the GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def lost(self, err: BaseException) -> DistributedError:
        """The error to raise when a collective failed: marks the world broken, names the
        rank that died when this process started it."""
        self.broken = True
        said = self.workers.failure() if self.workers is not None else None
        if said:
            return DistributedError(f"{said} The other ranks stopped.")
        return DistributedError(f"Lost contact with another rank ({_reason(err, self.timeout)}); all ranks stopped.")

    def close(self) -> None:
        """Leave the world: rank 0 of a started world ends every worker (waiting briefly
        for those told to exit, by signal otherwise)."""
        if self.closed:
            return
        self.closed = True
        if self.workers is not None:
            self.workers.end(0.0 if self.broken else GRACE_SECONDS)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # peers gone: nothing left to tidy
                pass
        if self.threads_before:
            torch.set_num_threads(self.threads_before)


def _reason(err: BaseException, timeout: float) -> str:
    text = " ".join(str(err).split())
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return f"no answer within {timeout:g} s (--dist-timeout)"
    if "closed" in text.lower() or "reset" in text.lower() or "refused" in text.lower():
        return "its connection closed"
    return text[:160]


def start(layout: Layout) -> World:
    """Join (torchrun) or create (spawn) the world `layout` describes; this process's rank."""
    if dist.is_initialized():
        raise UsageError(
            "A multi-device model is already loaded in this process; close() it before loading another."
        )
    if layout.launcher == "torchrun":
        launch = torchrun_launch()
        assert launch is not None
        return _join(layout, launch.rank, launch.world_size, launch.local_rank, None, None)
    return _spawn(layout)


def _device(layout: Layout, local_rank: int) -> torch.device:
    if layout.device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _join(
    layout: Layout,
    rank: int,
    size: int,
    local_rank: int,
    store: dist.Store | None,
    workers: Workers | None,
) -> World:
    device = _device(layout, local_rank)
    threads = torch.get_num_threads()
    if layout.threads and layout.device_type == "cpu":
        torch.set_num_threads(layout.threads)
    timeout = timedelta(seconds=layout.timeout)
    kwargs = {"device_id": device} if layout.backend == "nccl" else {}
    if store is None:  # torchrun: its store (the agent's, shared by every world it hosts)
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        # A fresh prefix for every world this process joins there: torch names every new
        # default group alike, and a second world on that store would read the first one's
        # addresses (a process may load, close and load again). Both sides count alike:
        # torchrun's ranks all run the same sequence of loads.
        prefix = f"parrot/{next(_WORLDS)}"
    else:
        prefix = "parrot"  # a world parrot started has a store of its own
    dist.init_process_group(layout.backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=size, timeout=timeout, **kwargs)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    world = World(rank, size, local_rank, device, layout.backend, layout.timeout, control,
                  layout.launcher, workers, threads_before=threads)
    if world.leader:
        atexit.register(world.close)
    return world


def _spawn(layout: Layout) -> World:
    """Rank 0 here; ranks 1..N-1 as child processes that check in on a TCPStore first, so
    a child that cannot start is reported at once instead of after a rendezvous timeout."""
    n = layout.world_size
    store = dist.TCPStore("127.0.0.1", 0, n, is_master=True, timeout=timedelta(seconds=STARTUP_SECONDS),
                          wait_for_workers=False)
    debug = os.environ.get("PARROT_DEBUG", "") not in ("", "0")
    tmpdir = Path(tempfile.mkdtemp(prefix="parrot-ranks-"))
    procs, logs = [], []
    threads = str(layout.threads or 1)
    try:
        for rank in range(1, n):
            spec = {"port": store.port, "rank": rank, "size": n, "layout": layout.__dict__, "parent": os.getpid()}
            env = {**os.environ, WORKER_ENV: json.dumps(spec), "OMP_NUM_THREADS": threads}
            log = None if debug else tmpdir / f"rank{rank}.log"
            err = None if log is None else open(log, "w")  # noqa: SIM115 (handed to the child)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "parrot_cli.distributed.worker"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=env, start_new_session=True, preexec_fn=_die_with_parent,
            ))
            logs.append(log)
            if err is not None:
                err.close()
        workers = Workers(procs, logs, tmpdir)
        _wait_for_check_in(store, workers, n)
        return _join(layout, 0, n, 0, store, workers)
    except BaseException:
        Workers(procs, logs, tmpdir).end(0.0)
        raise


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGKILL when rank 0 dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_for_check_in(store: dist.TCPStore, workers: Workers, n: int) -> None:
    keys = [f"parrot/ready/{r}" for r in range(1, n)]
    deadline = time.monotonic() + STARTUP_SECONDS
    while not store.check(keys):
        said = workers.failure(wait=0.0)
        if said:
            raise DistributedError(f"{said} The model's ranks could not start.")
        if time.monotonic() > deadline:
            raise DistributedError(f"The model's other ranks did not start within {STARTUP_SECONDS:g} s.")
        time.sleep(0.02)


def join_as_worker() -> World:
    """In a worker parrot started: check in with rank 0, then join its world."""
    spec = json.loads(os.environ[WORKER_ENV])
    layout = Layout(**{**spec["layout"], "notes": tuple(spec["layout"].get("notes", ()))})
    if os.getppid() != spec["parent"]:  # rank 0 died before PDEATHSIG was armed
        raise SystemExit(1)
    store = dist.TCPStore("127.0.0.1", spec["port"], spec["size"], is_master=False,
                          timeout=timedelta(seconds=STARTUP_SECONDS))
    store.set(f"parrot/ready/{spec['rank']}", "1")
    return _join(layout, spec["rank"], spec["size"], spec["rank"], store, None)
