"""From a checkpoint directory to a ready `GPT` module on its device.

The model is built on the meta device (no random initialisation, no memory), then the
memory-mapped weights are cast, moved and assigned block by block, so no second full
copy exists in RAM when dtype and device already match. Modules a quantized checkpoint
stores quantized (`quantization_config.json`, layout in `quantize/format.py`) are packed
for the device's kernel straight from their stored codes, with no float detour. With a
load-time quantization spec each block's float Linears are quantized as the block is
assigned, through the same constructors. The mapped pages of weights already copied are
handed back to the OS: peak memory holds the quantized model plus one block in float,
never the whole model in float.

A multi-device rank passes a `Shard` (its part of the model, `parrot_cli/distributed/`):
it builds the model with the rank's head counts, reads only the tensors the rank holds,
and keeps only its rows or columns of each, sliced before anything is cast or packed.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

from parrot_cli.checkpoint.store import load_weights, weight_files
from parrot_cli.config import Config
from parrot_cli.errors import CheckpointError, OutOfMemoryError, is_out_of_memory
from parrot_cli.machine import malloc_trim
from parrot_cli.model import GPT
from parrot_cli.quantize import QuantSpec
from parrot_cli.quantize.apply import (
    EMBEDDING,
    HEAD,
    quantize_linear,
    replace,
    stored_module,
    targets,
)
from parrot_cli.quantize.format import QuantizedWeight
from parrot_cli.quantize.qconfig import QuantizationConfig, read_quantization_config
from parrot_cli.resources import check_memory

# The tensor names of one stored quantized module (format.QuantizedWeight.tensors).
M = TypeVar("M", bound=torch.nn.Module)
QUANTIZED_TENSORS = ("qweight", "scales", "zeros", "qzeros", "perm")


class Shard:
    """What one process holds of the model: here all of it. Multi-device strategies
    (`parrot_cli/distributed/`) subclass it; `build_model` asks it, in this order, which
    config to build, which tensors to read, what part of each to keep, and how to put a
    block's tensors into the module."""

    def config(self, config: Config) -> Config:
        """The config this process builds (tensor parallel: its share of the heads)."""
        return config

    def holds(self, name: str) -> bool:
        """Whether this process reads tensor (or quantized module) `name` at all."""
        return True

    def take(self, name: str, value: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        """This process's part of tensor `name` (or of the quantized weight of module
        `name` + ".weight"), still in the checkpoint's dtype."""
        return value

    def prepare(self, model: GPT, device: torch.device) -> None:
        """Called on the meta-device model before any weight is assigned."""

    def assign(self, model: GPT, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Put one block's float tensors (cast and moved) into the model; returns those the
        model now holds as they are (a checkpoint's mapped pages under them stay)."""
        model.load_state_dict(tensors, strict=False, assign=True)
        return list(tensors.values())


WHOLE = Shard()


def build_model(
    config: Config,
    checkpoint_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantize: QuantSpec | None = None,
    stored: QuantizationConfig | None = None,
    shard: Shard = WHOLE,
) -> GPT:
    """Build on the meta device, then assign the memory-mapped weights (cast and moved)
    one block at a time: no random initialisation, no second copy when dtype and device
    already match. Modules `stored` (the checkpoint's quantization config, read here when
    not given) holds quantized are packed for the device from their codes; `quantize`
    replaces the float Linears it targets as their block is loaded. `shard` says what part
    of the model this process holds (all of it by default)."""
    state = load_weights(checkpoint_dir)
    _check_layers(config, state, checkpoint_dir)
    model = meta_model(shard.config(config))
    if stored is None:
        stored = read_quantization_config(checkpoint_dir)
    held_quantized = dict(stored.modules) if stored else {}
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    # Names and shapes are the whole model's (a shard's own shapes are its cut of them).
    whole = model if shard is WHOLE else meta_model(config)
    _check_names(whole, state, held_quantized, config, checkpoint_dir)
    quantized = targets(model, quantize) - set(held_quantized)
    tied_quantized = config.tie_embeddings and EMBEDDING in held_quantized
    if config.tie_embeddings and HEAD in quantized:
        if tied_quantized:
            quantized.discard(HEAD)  # the head already runs on the embedding's codes
        else:
            state[HEAD + ".weight"] = state["transformer.wte.weight"]  # the head gets its own copy
    state = {k: v for k, v in state.items() if shard.holds(k)}
    shard.prepare(model, device)
    if quantize is None:
        # What loading allocates (tensors cast or moved; the rest stay memory-mapped),
        # refused with the numbers before the first copy.
        copies = sum(
            t.numel() * dtype.itemsize
            for t in state.values()
            if t.is_floating_point() and (t.dtype != dtype or device.type != "cpu")
        )
        if device.type == "cpu" and copies:
            check_memory(copies, f"Loading {checkpoint_dir.name} in {str(dtype).removeprefix('torch.')}",
                         "try --quantize int8 or int4, or a smaller model")
    release = _PageRelease(weight_files(checkpoint_dir))
    try:
        for part in _by_block(state):
            kept = _assign(model, part, quantized, quantize, held_quantized, device, dtype, shard)
            held = {t.data_ptr() for t in kept}
            release(t for t in part.values() if t.data_ptr() not in held)
    except (RuntimeError, MemoryError, OSError) as err:
        if is_out_of_memory(err):
            raise OutOfMemoryError(
                f"Out of memory loading {checkpoint_dir} onto {device}; try --quantize int8 or int4, "
                "a lower --precision, or a smaller model."
            ) from err
        if isinstance(err, OSError):
            raise
        raise CheckpointError(
            f"{checkpoint_dir} has weights that do not fit its config ({' '.join(str(err).split())})."
        ) from err
    if HEAD in held_quantized:
        pass  # the checkpoint stores the head's own quantized copy (`parrot quantize --quantize-head`)
    elif tied_quantized and shard.holds(EMBEDDING):
        model.lm_head = model.transformer.wte.tied_head()
    elif config.tie_embeddings and HEAD not in quantized and model.lm_head.weight is not model.transformer.wte.weight:
        model.lm_head.weight = model.transformer.wte.weight
    model.rope.build(1, device)
    return model.eval().requires_grad_(False)


class _SkipInit(TorchFunctionMode):
    """Skips parameter initialisation while a model is built on the meta device: there is
    nothing to initialise, and torch's meta `normal_` imports torch._dynamo on first use
    (~4 s of every process that loads a model, measured on a loaded 2-core machine)."""

    INIT = frozenset({
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
        torch.nn.init.kaiming_uniform_, torch.nn.init.trunc_normal_, torch.nn.init.xavier_uniform_,
        torch.nn.init.ones_, torch.nn.init.zeros_,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INIT:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def meta_model(config: Config) -> GPT:
    """The model `config` describes on the meta device: shapes without memory. A validated
    config bounds its size, so this takes milliseconds (under a second at MAX_LAYERS)."""
    return on_meta(GPT, config)


def on_meta(build: Callable[..., M], *args: Any) -> M:
    """`build(*args)` on the meta device with initialisation skipped (`_SkipInit`): every
    skeleton parrot builds (a model, a block, shapes to check against) goes through here,
    so none pays for torch's meta `normal_` (~80 MB and seconds of imports)."""
    with torch.device("meta"), _SkipInit():
        return build(*args)


def _check_layers(config: Config, state: dict[str, torch.Tensor], checkpoint_dir: Path) -> None:
    """The config's layer count is the one the weights hold, checked before a model of
    that many layers is built."""
    held = {int(m[1]) for name in state if (m := re.match(r"transformer\.h\.(\d+)\.", name))}
    if held != set(range(config.n_layer)):
        raise CheckpointError(
            f"{checkpoint_dir} does not match its config: the config has {config.n_layer} layers but "
            f"the weights hold {len(held)}."
        )


def _check_names(
    model: GPT,
    state: dict[str, torch.Tensor],
    held_quantized: dict[str, dict],
    config: Config,
    checkpoint_dir: Path,
) -> None:
    """The checkpoint holds exactly the tensors its config and quantization config call
    for: a float `weight` for every module except the quantized ones, which hold their
    quantized tensors instead (checked in detail when each is read)."""
    every = set(model.state_dict())  # a tied model lists lm_head.weight too
    expected = {k for k in every if not (config.tie_embeddings and k == HEAD + ".weight")}
    unknown = sorted(m for m in held_quantized if m + ".weight" not in every)
    if unknown:
        raise CheckpointError(
            f"{checkpoint_dir} quantizes {unknown[0]!r}, which is not a weight of this model."
        )
    expected -= {m + ".weight" for m in held_quantized}
    names = {
        k for k in state
        if not (k.rpartition(".")[0] in held_quantized and k.rpartition(".")[2] in QUANTIZED_TENSORS)
    }
    missing, unexpected = expected - names, names - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[0]!r}" if missing else f"unexpected {sorted(unexpected)[0]!r}"
        raise CheckpointError(f"{checkpoint_dir} does not match its config ({what}).")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name in sorted(names):
        if tuple(state[name].shape) != shapes[name]:
            raise CheckpointError(
                f"{checkpoint_dir} does not match its config: {name} is {list(state[name].shape)}, "
                f"but the config makes it {list(shapes[name])}."
            )


def _by_block(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The weights in loading order: the embedding, final norm and head, then each block."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = re.match(r"transformer\.h\.(\d+)\.", name)
        (blocks.setdefault(int(match[1]), {}) if match else rest)[name] = tensor
    # The rest first: its float embedding is the largest single transient, and the
    # quantized blocks are not yet there to add to it.
    return [rest] + [blocks[i] for i in sorted(blocks)]


def _assign(
    model: GPT,
    part: dict[str, torch.Tensor],
    quantized: set[str],
    spec: QuantSpec | None,
    held_quantized: dict[str, dict],
    device: torch.device,
    dtype: torch.dtype,
    shard: Shard = WHOLE,
) -> list[torch.Tensor]:
    """Assign one block's float tensors, build its stored-quantized modules and quantize
    its targeted Linears, each cut to `shard`'s part first; returns the tensors the model
    now holds (pages of the others can go back to the OS)."""
    owners = {name: name.rpartition(".")[0] for name in part}
    special = quantized | set(held_quantized)

    def bias_of(owner: str) -> torch.Tensor | None:
        bias = part.get(owner + ".bias")
        return None if bias is None else shard.take(owner + ".bias", bias).to(device, dtype)

    floats = {
        name: shard.take(name, tensor).to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        for name, tensor in part.items()
        if owners[name] not in special
    }
    kept = shard.assign(model, floats)
    for owner in sorted(set(owners.values()) & set(held_quantized)):
        select = functools.partial(shard.take, owner + ".weight")
        module = stored_module(owner, part, held_quantized[owner], bias_of(owner), device, dtype, select)
        replace(model, owner, module)
        kept += list(module.buffers())
    for owner in sorted(set(owners.values()) & quantized):
        linear = model.get_submodule(owner)
        weight = part[owner + ".weight"]
        select = functools.partial(shard.take, owner + ".weight")
        module = quantize_linear(spec, weight.to(device), bias_of(owner), dtype, select)
        if (module.out_features, module.in_features) != (linear.out_features, linear.in_features):
            raise RuntimeError(f"{owner}.weight is {tuple(weight.shape)}")
        replace(model, owner, module)
    return kept


def page_release(checkpoint_dir: Path) -> _PageRelease:
    """A callable that hands the mapped pages of `checkpoint_dir`'s tensors back to the OS
    once they have been copied (packed, cast, quantized)."""
    return _PageRelease(weight_files(checkpoint_dir))


class _PageRelease:
    """Hands memory that loading no longer needs back to the OS after each block, so the
    peak stays near the final model's size: the mapped pages of checkpoint tensors that
    were copied (cast, moved or quantized) -- only whole pages inside the weight files'
    private mappings, which the kernel re-reads from the file if anything touches them
    again -- and the temporaries glibc's malloc keeps cached (`malloc_trim`; without it a
    quantized load ended with ~300 MB of freed heap still resident). Linux only."""

    MADV_DONTNEED = 4

    def __init__(self, files: list[Path]) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.libc = None
        if not sys.platform.startswith("linux"):
            return
        self.libc = ctypes.CDLL(None, use_errno=True)
        names = {str(Path(f).resolve()) for f in files}
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:
            return
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] in names:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((low, high))

    def __call__(self, tensors) -> None:
        if self.libc is None:
            return
        page = mmap.PAGESIZE
        for t in tensors:
            if t.device.type != "cpu" or not t.numel():
                continue
            begin = t.data_ptr()
            end = begin + t.numel() * t.element_size()
            if not any(low <= begin and end <= high for low, high in self.ranges):
                continue
            first, last = -(-begin // page) * page, end // page * page
            if last > first:
                self.libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), self.MADV_DONTNEED)
        malloc_trim()
