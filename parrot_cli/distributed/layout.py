"""Which multi-device layout a request asks for, checked before any process starts.

Every impossible request (an unknown strategy, `--cpu-offload` without fsdp, more devices
than the machine has, heads that do not split, a torchrun world that disagrees with
`--devices`) is one UsageError sentence here, from the config alone. No torch import:
`parrot estimate` plans with the same rules without loading torch.

What a "device" is: on CUDA one GPU per rank; on CPU one process per rank, each with its
share of the cores (`--threads` sets the threads of each rank instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from parrot_cli.config import Config
from parrot_cli.errors import UsageError

STRATEGIES = ("tp", "sequential", "fsdp")
SINGLE = ("none", "single", "auto", "")  # no strategy named: --devices decides
BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT = 60.0  # seconds a rank waits in a collective before giving up
# The module names whose inputs tensor parallelism cuts (row-parallel: the sums of their
# partial products are all-reduced); their outputs (qkv and fc) are cut by rows.
ROW_PARALLEL = ("attn.proj", "mlp.proj")
FSDP_NOTE = (
    "--strategy fsdp trades speed for memory: every token gathers every weight from all "
    "ranks; prefer --strategy tp or sequential when the model fits."
)


@dataclass(frozen=True)
class Launch:
    """A process started by torchrun (or any launcher that sets torch's env:// variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def torchrun_launch() -> Launch | None:
    """The torchrun world this process belongs to, from its environment; None outside one."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        return None
    return Launch(rank, size, local, local_size)


def is_secondary_rank() -> bool:
    """True in a torchrun rank other than 0: such a rank neither reads the terminal nor
    prints what every rank would print (rank 0 speaks for the world)."""
    launch = torchrun_launch()
    return launch is not None and launch.rank != 0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Layout:
    """How the model is split and how the ranks are started."""

    strategy: str  # tp | sequential | fsdp
    world_size: int
    device_type: str  # cpu | cuda
    backend: str  # gloo | nccl
    timeout: float  # seconds
    cpu_offload: bool = False
    threads: int | None = None  # torch threads of each rank on CPU (None: torch's default)
    launcher: str = "spawn"  # "spawn": parrot starts ranks 1..N-1 itself; "torchrun"
    notes: tuple[str, ...] = ()  # what to tell the user once, at start

    def describe(self) -> str:
        offload = " with CPU offload" if self.cpu_offload else ""
        unit = "GPUs" if self.device_type == "cuda" else "processes"
        return f"{self.strategy} over {self.world_size} {unit}{offload} ({self.backend})"


@dataclass(frozen=True)
class TensorSplit:
    """One tensor-parallel rank's share: query heads, kv heads (replicated when there are
    fewer kv heads than ranks), MLP width."""

    n_head: int
    n_kv: int
    intermediate_size: int
    kv_replicas: int  # ranks that hold each kv head (1: kv heads are split)

    def config(self, config: Config) -> Config:
        """The config one rank builds: its heads, its MLP width, the same head size."""
        return replace(
            config,
            n_head=self.n_head,
            n_query_groups=self.n_kv,
            intermediate_size=self.intermediate_size,
            head_size=config.head_size,
        )


def tensor_split(config: Config, n: int) -> TensorSplit:
    """Each rank's heads and MLP width under `--strategy tp` over n ranks, or a UsageError
    that names what does not split and what to use instead."""
    heads, kv, inter = config.n_head, config.n_query_groups, config.intermediate_size
    problem = None
    if heads % n:
        problem = f"{heads} attention heads do not split over {n} devices"
    elif kv % n and n % kv:
        problem = f"{kv} key/value heads neither split over nor repeat evenly on {n} devices"
    elif inter % n:
        problem = f"MLP width {inter} does not split over {n} devices"
    if problem:
        fits = [d for d in range(2, 9) if d != n and _splits(config, d)]
        other = f" (or --devices {' or '.join(map(str, fits[:3]))})" if fits else ""
        name = config.name or "this model"
        raise UsageError(
            f"--strategy tp splits the heads evenly, and {name}'s {problem}; "
            f"use --strategy sequential{other}."
        )
    return TensorSplit(heads // n, max(1, kv // n), inter // n, max(1, n // kv))


def _splits(config: Config, n: int) -> bool:
    kv = config.n_query_groups
    return not (config.n_head % n or (kv % n and n % kv) or config.intermediate_size % n)


def layer_split(n_layer: int, n: int) -> list[range]:
    """The blocks of each rank under `--strategy sequential`: contiguous, as even as
    possible, the first ranks taking one more when they do not divide (the last rank
    also holds the head)."""
    if n > n_layer:
        raise UsageError(
            f"--strategy sequential gives each device whole layers, and {n} devices are more "
            f"than the model's {n_layer} layers."
        )
    base, extra = divmod(n_layer, n)
    ranges, start = [], 0
    for r in range(n):
        size = base + (1 if r < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def check_tensor_parallel_quantization(
    config: Config,
    split: TensorSplit,
    n: int,
    group_size: int | None,
    stored_modules: dict[str, dict[str, Any]] | None,
) -> None:
    """Quantized weights split only where their layout allows: a row-parallel layer's
    cut must fall on its scale groups (load-time int4 `group_size`, or each stored
    module's), act-order weights cannot be cut along their inputs, and torch's int4
    packing needs a multiple of 16 rows on each rank."""
    local_inputs = {"attn.proj": split.n_head * config.head_size, "mlp.proj": split.intermediate_size}
    gated = config.mlp_class == "GatedMLP"
    local_rows = {
        "attn.qkv": (split.n_head + 2 * split.n_kv) * config.head_size,
        "mlp.fc": split.intermediate_size * (2 if gated else 1),
    }
    if group_size:
        for kind, size in local_inputs.items():
            if size % group_size:
                raise UsageError(
                    f"--strategy tp over {n} devices gives each {kind} {size} inputs, which int4 "
                    f"groups of {group_size} do not divide; use --group-size 32 or --strategy sequential."
                )
        for kind, rows in local_rows.items():
            if rows % 16:
                raise UsageError(
                    f"--strategy tp over {n} devices gives each {kind} {rows} rows, and torch's int4 "
                    "kernel needs multiples of 16; use --strategy sequential."
                )
    for name, meta in (stored_modules or {}).items():
        kind = ".".join(name.split(".")[-2:])
        if kind in ROW_PARALLEL and meta.get("act_order"):
            raise UsageError(
                f"--strategy tp cuts {kind} along its inputs, which act-order (GPTQ desc_act) "
                "weights store out of order; use --strategy sequential."
            )
        group = meta.get("group_size")
        inputs = config.n_head * config.head_size if kind == "attn.proj" else config.intermediate_size
        if kind in ROW_PARALLEL and group and group < inputs and local_inputs[kind] % group:
            raise UsageError(
                f"--strategy tp over {n} devices cuts {kind} inside its quantization groups of "
                f"{group}; use --strategy sequential."
            )
        if meta.get("bits") == 4 and kind in local_rows and local_rows[kind] % 16:
            raise UsageError(
                f"--strategy tp over {n} devices gives each {kind} {local_rows[kind]} rows, and "
                "torch's int4 kernel needs multiples of 16; use --strategy sequential."
            )


def resolve_strategy(name: str | None) -> str | None:
    """'tp' | 'sequential' | 'fsdp', or None: one device, or (auto) chosen from --devices."""
    if name is None or name.strip().lower() in SINGLE:
        return None
    key = name.strip().lower()
    if key not in STRATEGIES:
        raise UsageError(f"Unknown strategy {name!r}; choose tp, sequential or fsdp (or none).")
    return key


def plan_layout(
    strategy: str | None,
    devices: int | None,
    *,
    config: Config,
    device_type: str,
    cuda_devices: int = 0,
    cpu_offload: bool = False,
    backend: str | None = None,
    timeout: float | None = None,
    threads: int | None = None,
    compile: bool = False,
    quantized: bool = False,
    group_size: int | None = None,
    stored_modules: dict[str, dict[str, Any]] | None = None,
    launch: Launch | None = None,
    check_available: bool = True,
) -> Layout | None:
    """The layout for these options, or None for one device in this process. Every
    impossible combination is a UsageError, raised before anything starts
    (`check_available=False` plans for another machine: `parrot estimate`)."""
    chosen = resolve_strategy(strategy)
    if devices is not None and devices < 1:
        raise UsageError("--devices must be at least 1.")
    if cpu_offload and chosen != "fsdp":
        raise UsageError("--cpu-offload applies to --strategy fsdp only (it keeps the weight shards in CPU memory).")
    if launch is not None:
        if devices is not None and devices != launch.world_size:
            raise UsageError(
                f"torchrun started {launch.world_size} processes but --devices says {devices}; "
                "drop --devices or make the two agree."
            )
        devices = launch.world_size
    if chosen is None and (devices is None or devices == 1):
        return None
    if devices is None:
        if device_type != "cuda":
            raise UsageError(
                f"--strategy {chosen} on CPU needs --devices N: the number of processes to split "
                "the model over (each gets its share of the cores)."
            )
        devices = cuda_devices
        if devices < 1:
            raise UsageError(f"--strategy {chosen} needs --devices N: how many devices to split the model over.")
    notes: list[str] = []
    if chosen is None:
        chosen = "tp" if _splits(config, devices) and not compile else "sequential"
        why = "" if chosen == "tp" else f" (its {config.n_head} heads do not split over {devices})"
        notes.append(f"Splitting the model with --strategy {chosen}{why}.")
    if launch is None and check_available:
        available = cuda_devices if device_type == "cuda" else usable_cores()
        if devices > available:
            if device_type == "cuda":
                raise UsageError(f"--devices {devices} asks for more GPUs than the {available} torch sees here.")
            raise UsageError(
                f"--devices {devices} is more than this machine's {available} CPU cores; on CPU each "
                "device is one process with its share of the cores."
            )
    elif launch is not None and device_type == "cuda" and launch.local_world_size > cuda_devices:
        raise UsageError(
            f"torchrun started {launch.local_world_size} processes on this node but torch sees "
            f"{cuda_devices} GPUs here."
        )
    if compile:
        raise UsageError(f"--compile does not combine with --strategy {chosen} yet; drop one of them.")
    if chosen == "tp":
        split = tensor_split(config, devices)
        check_tensor_parallel_quantization(config, split, devices, group_size, stored_modules)
    elif chosen == "sequential":
        layer_split(config.n_layer, devices)
    elif quantized:
        raise UsageError(
            "--strategy fsdp shards float weights; run quantized weights with --strategy tp or sequential."
        )
    else:
        notes.append(FSDP_NOTE)
    backend = (backend or "auto").strip().lower()
    if backend not in BACKENDS:
        raise UsageError(f"Unknown backend {backend!r}; choose auto, gloo or nccl.")
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise UsageError("--dist-backend nccl needs CUDA devices; use gloo on CPU.")
    if backend == "gloo" and device_type == "cuda" and chosen != "tp":
        raise UsageError(f"gloo cannot move CUDA tensors the way --strategy {chosen} needs; use --dist-backend nccl.")
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if not timeout > 0:
        raise UsageError("--dist-timeout must be a positive number of seconds.")
    if threads is None and device_type == "cpu":
        per_node = launch.local_world_size if launch else devices
        threads = max(1, usable_cores() // per_node)
    return Layout(
        strategy=chosen,
        world_size=devices,
        device_type=device_type,
        backend=backend,
        timeout=float(timeout),
        cpu_offload=cpu_offload,
        threads=threads,
        launcher="torchrun" if launch else "spawn",
        notes=tuple(notes),
    )
