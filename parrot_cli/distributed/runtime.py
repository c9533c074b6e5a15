"""Inference across ranks: rank 0 leads, the others follow.

Rank 0 owns the terminal and the `LLM` the user holds. Every operation that needs the
model (allocating the KV cache, generating, computing logits, reporting memory) is a
command: rank 0 broadcasts its name and arguments on the control group, then every rank
runs the same `LLM` method on its own part of the model (`serve` is the followers' loop).
So generation on every rank goes through the one sampling core
(`generation.generate_tokens`); `Ranks` is the lockstep that core is given:

- each step every rank runs its part of the forward; the sampling rank (rank 0, or the
  last rank of a pipeline) samples and broadcasts the token, so all ranks feed the same
  token to the next step and stop on the same EOS;
- before each further step rank 0 says whether to go on (its consumer may have stopped on
  a stop string, or been closed), so the followers never wait for a step that will not come;
- Ctrl-C on rank 0 is held until the step in flight is complete on every rank, then raised
  where the ranks are in step: a chat keeps its session; a second Ctrl-C acts at once.

A failed collective (a rank died, or did not answer within --dist-timeout) is one
DistributedError on rank 0 that names the rank when parrot started it; followers leave.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from parrot_cli.distributed.launch import World
from parrot_cli.distributed.layout import Layout
from parrot_cli.errors import DistributedError, ParrotError

if TYPE_CHECKING:
    from parrot_cli.model import GPT
    from parrot_cli.quantize import QuantSpec

# The LLM methods rank 0 may ask every rank to run (anything else is refused).
COMMANDS = ("_allocate_cache", "_tokens_here", "_logits_here", "_memory_here")
EXIT = "exit"


@dataclass(frozen=True)
class LoadRequest:
    """What every rank needs to load its part: resolved on rank 0, sent to all."""

    checkpoint_dir: str
    precision: str
    quantization: QuantSpec | None
    layout: Layout
    fixed_max_seq_length: int | None = None


class Ranks:
    """One rank's side of the lockstep (implements `generation.Lockstep`), and rank 0's
    command channel to the others."""

    def __init__(self, world: World, sampler: int) -> None:
        self.world = world
        self.sampler = sampler
        self.leader = world.rank == 0
        self.samples = world.rank == sampler
        self._token = torch.zeros(1, dtype=torch.long, device=world.comm_device)
        self._go = torch.zeros(1, dtype=torch.long)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size

    # ------------------------------------------------------------------ commands

    def call(self, method: str, *args: Any) -> None:
        """Rank 0: ask every other rank to run LLM.`method`(*args) now (rank 0 runs it too)."""
        if self.world.broken:
            raise DistributedError("The model's ranks stopped after an earlier failure; load it again.")
        self._broadcast_object((method, args))

    def receive(self) -> tuple[str, tuple]:
        """A follower: the next command from rank 0."""
        return self._broadcast_object(None)

    def _broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.world.control)
        except RuntimeError as err:
            raise self.world.lost(err) from err
        return box[0]

    def agree(self, error: str | None) -> None:
        """Every rank says whether its part of a command worked; the first failure is raised
        on every rank (rank 0 shows it), so no rank goes on alone."""
        said: list[str | None] = [None] * self.size
        try:
            dist.all_gather_object(said, error, group=self.world.control)
        except RuntimeError as err:
            raise self.world.lost(err) from err
        failed = next((s for s in said if s), None)
        if failed:
            err = DistributedError(failed)
            err.quiet = not self.leader  # rank 0 tells the user; the others just leave
            raise err

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank (control group)."""
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, value, group=self.world.control)
        except RuntimeError as err:
            raise self.world.lost(err) from err
        return out

    # ------------------------------------------------------------------ lockstep

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One step of the forward on every rank. On rank 0, Ctrl-C waits for its end."""
        pending: list[int] = []
        restore = None
        if self.leader and threading.current_thread() is threading.main_thread():
            def hold(signum: int, frame: Any) -> None:
                if pending:  # a second Ctrl-C: now, whatever it leaves behind
                    raise KeyboardInterrupt
                pending.append(signum)

            restore = signal.signal(signal.SIGINT, hold)
        try:
            yield
        except KeyboardInterrupt:
            self.world.broken = True
            raise
        except RuntimeError as err:
            if is_communication_error(err):
                raise self.world.lost(err) from err
            self.world.broken = True  # this rank failed mid-step: the others wait in vain
            raise
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)
        if pending:
            raise KeyboardInterrupt

    def share(self, token: int) -> int:
        """The sampling rank's token, on every rank."""
        if self.size == 1:
            return token
        self._token.fill_(token)
        dist.broadcast(self._token, src=self.sampler)
        return int(self._token)

    def proceed(self) -> bool:
        """Rank 0 says "one more step" (it is asked for one); followers hear whether to."""
        return self._say(1)

    def stop(self) -> None:
        """Rank 0: the followers wait for a step that will not come; tell them."""
        if self.leader and not self.world.broken:
            self._say(0)

    def _say(self, go: int) -> bool:
        if self.size == 1:
            return True
        self._go.fill_(go)
        try:
            dist.broadcast(self._go, src=0, group=self.world.control)
        except RuntimeError as err:
            raise self.world.lost(err) from err
        return bool(int(self._go))

    def to_leader(self, logits: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The sampling rank's logits on rank 0 (a pipeline computes them on its last rank)."""
        if self.sampler == 0:
            return logits
        buffer = logits.contiguous() if self.samples else torch.empty(shape, dtype=dtype, device=self.world.comm_device)
        buffer = buffer.to(self.world.comm_device)
        dist.broadcast(buffer, src=self.sampler)
        return buffer if self.leader else None

    # ------------------------------------------------------------------ ending

    def close(self) -> None:
        """Rank 0: tell the others to leave (when they still listen), then end the world."""
        if self.world.closed:
            return
        if self.leader and not self.world.broken:
            with contextlib.suppress(ParrotError):
                self._broadcast_object((EXIT, ()))
        self.world.close()


def is_communication_error(err: BaseException) -> bool:
    """Whether a collective failed (a peer died or timed out), not this rank's own work."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return any(mark in text for mark in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))


def sampler_rank(layout: Layout) -> int:
    """Which rank has the logits: the last one of a pipeline, else rank 0."""
    return layout.world_size - 1 if layout.strategy == "sequential" else 0


def build_part(request: LoadRequest, world: World) -> GPT:
    """This rank's part of the model, loaded from the memory-mapped checkpoint: its slice
    of the blocks (sequential), its heads and MLP columns (tp), or its shards (fsdp)."""
    from parrot_cli.api import precision_dtype
    from parrot_cli.checkpoint.load import WHOLE, build_model, page_release
    from parrot_cli.checkpoint.store import read_info
    from parrot_cli.kernels import can_pack, pack_linears
    from parrot_cli.quantize.qconfig import read_quantization_config

    directory = Path(request.checkpoint_dir)
    info = read_info(directory)
    stored = read_quantization_config(directory)
    dtype = precision_dtype(request.precision)
    layout, device = request.layout, world.device
    shard = WHOLE
    if layout.strategy == "tp":
        from parrot_cli.distributed.tp import TensorParallelShard

        shard = TensorParallelShard(info.config, world.rank, world.size)
    elif layout.strategy == "sequential":
        from parrot_cli.distributed.sequential import LayerShard

        shard = LayerShard(info.config, world.rank, world.size)
    elif layout.strategy == "fsdp":
        from torch.distributed.device_mesh import DeviceMesh

        from parrot_cli.distributed.fsdp import ShardedParameters

        mesh = DeviceMesh.from_group(dist.group.WORLD, device.type)
        shard = ShardedParameters(mesh, layout.cpu_offload, dtype)
    model = build_model(info.config, directory, device, dtype, quantize=request.quantization,
                        stored=stored, shard=shard)
    if layout.strategy == "tp":
        from parrot_cli.distributed import tp

        tp.prepare(model)
    elif layout.strategy == "sequential":
        from parrot_cli.distributed import sequential

        sequential.prepare(model, world.rank, world.size, dtype, device)
    if layout.strategy != "fsdp" and can_pack(device, dtype):
        pack_linears(model, page_release(directory))  # this rank's plain Linears (FSDP's stay its own)
    return model


def serve(world: World) -> None:
    """A follower's life: receive the load request, load this rank's part, then run rank
    0's commands until it says exit (or stops answering)."""
    from parrot_cli.api import LLM

    request: LoadRequest = Ranks(world, 0).receive()[1][0]
    ranks = Ranks(world, sampler_rank(request.layout))
    llm = None
    try:
        llm = LLM.follower(request, world, ranks)
        error = None
    except ParrotError as err:
        error = f"rank {world.rank}: {err}"
    except (MemoryError, torch.OutOfMemoryError):
        error = f"rank {world.rank}: out of memory loading its part of the model"
    ranks.agree(error)
    with torch.inference_mode():
        while True:
            method, args = ranks.receive()
            if method == EXIT:
                return
            if method not in COMMANDS:
                raise DistributedError(f"rank {world.rank}: unknown command {method!r} from rank 0")
            result = getattr(llm, method)(*args)
            if isinstance(result, Iterator):
                for _ in result:  # a follower's generation: run every step, keep nothing
                    pass


def follow(world: World) -> int:
    """Serve rank 0 until it closes the model; the exit code for this process. A follower
    speaks only for itself: the failures of others (and rank 0's decisions) are rank 0's
    to report. Its one line goes to stderr (a started rank's log, which rank 0 quotes)."""
    try:
        serve(world)
        return 0
    except KeyboardInterrupt:
        return 130
    except DistributedError as err:
        if not (getattr(err, "quiet", False) or world.broken):
            print(str(err), file=sys.stderr, flush=True)
        return 1
    except ParrotError as err:
        print(f"rank {world.rank}: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except Exception as err:  # the edge of a follower: one line, no traceback
        world.broken = True
        print(f"rank {world.rank}: {type(err).__name__}: {' '.join(str(err).split())[:300]}",
              file=sys.stderr, flush=True)
        return 1
    finally:
        world.close()


def follower_main() -> int:
    """The entry point of a rank parrot started (`python -m parrot_cli.distributed.worker`)."""
    from parrot_cli.distributed.launch import join_as_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    try:
        world = join_as_worker()
    except Exception as err:
        print(f"could not join the world ({' '.join(str(err).split())[:300]})", file=sys.stderr, flush=True)
        return 1
    return follow(world)
