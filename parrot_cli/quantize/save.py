"""`parrot quantize`: a float checkpoint -> a quantized one on disk, in the portable layout
(`quantize/format.py`), loaded later with no flag and no re-quantization.

The float checkpoint is read memory-mapped and streamed one block at a time (the
embedding, final norm and head first, then each transformer block, the order the loader
uses): a *block quantizer* turns the block's float tensors into `QuantizedWeight`s for the
modules it quantizes, the writer streams them to disk, and the block's pages are handed
back before the next one. Peak memory is about one block, whatever the model's size.

The round-to-nearest quantizer here (`rtn_quantizer`) calls the very functions load-time
`--quantize int4|int8` uses (`weight_only.quantize_int4/int8` on the weight exactly as
stored), so loading the result gives the same modules, bit for bit. Another method (GPTQ)
plugs in by passing its own block quantizer to `write_quantized`:

    def my_quantizer(block: Block) -> dict[str, QuantizedWeight]:
        ...  # block.index: 0..n_layer-1, or None for the rest; block.tensors: float
    write_quantized(source_dir, target, my_quantizer,
                    QuantizationConfig("gptq.int4", "gptq", details={...}), progress=...)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parrot_cli.checkpoint.info import CONFIG_FILE, INDEX_FILE, read_info, weight_files
from parrot_cli.checkpoint.store import CheckpointWriter, Progress, load_weights
from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.quantize import QuantSpec
from parrot_cli.quantize.format import QuantizedWeight
from parrot_cli.quantize.qconfig import (
    QUANT_CONFIG_FILE,
    QuantizationConfig,
    read_quantization_config,
)


@dataclass
class Block:
    """One step of the stream: the float tensors (checkpoint names -> memory-mapped
    tensors) of transformer block `index`, or of everything outside the blocks (index
    None: embedding, final norm, head), which comes first."""

    index: int | None
    tensors: dict[str, torch.Tensor]


BlockQuantizer = Callable[[Block], dict[str, QuantizedWeight]]  # module name -> its weight


@dataclass
class QuantizeResult:
    """What `write_quantized` wrote, for the summary a command prints."""

    target: Path
    source_bytes: int
    target_bytes: int
    seconds: float
    config: QuantizationConfig


def float_source(checkpoint_dir: Path) -> None:
    """Refuse a checkpoint that already holds quantized weights: quantizing quantized
    weights again only adds error. The message names the float source to use instead."""
    stored = read_quantization_config(checkpoint_dir)
    if stored is None:
        return
    provenance = read_info(checkpoint_dir).provenance
    source = provenance.get("source")
    if provenance.get("quantized_from"):
        fix = f"quantize the float checkpoint {provenance['quantized_from']} instead"
    elif provenance.get("format") == "gguf":
        fix = (f"convert its GGUF to float (`parrot convert {source or 'FILE.gguf'} --dtype bfloat16 "
               "--output DIR`) and quantize that")
    else:
        fix = f"quantize its float source{f' ({source})' if source else ''} instead"
    raise UsageError(f"{checkpoint_dir} already holds {stored.summary()} weights; {fix}.")


def default_target(source_dir: Path, mode: str, group_size: int | None, quantize_head: bool) -> Path:
    """The sibling a quantized checkpoint lands in: NAME-int4-g64, NAME-int8 (+ -head)."""
    suffix = f"-{mode}" + (f"-g{group_size}" if group_size else "") + ("-head" if quantize_head else "")
    return source_dir.with_name(source_dir.name + suffix)


def rtn_quantizer(spec: QuantSpec, modules: set[str]) -> BlockQuantizer:
    """Round-to-nearest: each of `modules` (a Linear's name) quantized on its own, with the
    same function load-time `--quantize` calls on the same stored tensor."""
    from parrot_cli.quantize.weight_only import quantize_int4, quantize_int8

    def quantize(block: Block) -> dict[str, QuantizedWeight]:
        out = {}
        for name, tensor in block.tensors.items():
            owner, _, kind = name.rpartition(".")
            if kind == "weight" and owner in modules:
                out[owner] = quantize_int8(tensor) if spec.mode.name == "int8" else quantize_int4(tensor, spec.group_size)
        return out

    return quantize


def quantize_checkpoint(
    source_dir: Path,
    mode: str,
    *,
    group_size: int | None = None,
    quantize_head: bool = False,
    output: Path | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """`parrot quantize int4|int8`: round-to-nearest on every Linear of the blocks (and the
    head with `quantize_head`), the same modules and values as load-time `--quantize`.
    The request is checked (group size, shapes) before anything is written."""
    from parrot_cli.checkpoint.load import meta_model
    from parrot_cli.quantize import plan
    from parrot_cli.quantize.apply import HEAD, targets

    source_dir = Path(source_dir)
    float_source(source_dir)
    info = read_info(source_dir)
    spec = plan(mode, info.config, torch.device("cpu"), group_size=group_size,
                group_size_from_user=group_size is not None, quantize_head=quantize_head,
                provenance=info.provenance)
    modules = targets(meta_model(info.config), spec)
    target = Path(output) if output is not None else default_target(source_dir, mode, spec.group_size, quantize_head)
    qconfig = QuantizationConfig(mode, "rtn", details={"group_size": spec.group_size, "quantize_head": quantize_head})
    tied_head = quantize_head and info.config.tie_embeddings and HEAD in modules
    return write_quantized(source_dir, target, rtn_quantizer(spec, modules), qconfig,
                           head_from_embedding=tied_head, progress=progress)


def write_quantized(
    source_dir: Path,
    target: Path,
    quantize_block: BlockQuantizer,
    qconfig: QuantizationConfig,
    *,
    head_from_embedding: bool = False,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Stream the float checkpoint `source_dir` block by block through `quantize_block`
    into a new checkpoint at `target` (atomic: `target.partial/` renamed when complete).
    `qconfig` gives mode, method and details; its module table is filled from what the
    quantizer returns. `head_from_embedding`: a tied model's head is quantized from the
    embedding table (the checkpoint then stores the head's own quantized copy, as
    load-time `--quantize-head` builds it)."""
    from parrot_cli.checkpoint.load import _by_block, _PageRelease

    start = time.perf_counter()
    source_dir, target = Path(source_dir), Path(target)
    if target.resolve() == source_dir.resolve():
        raise UsageError(f"--output {target} is the float checkpoint itself; write the quantized one elsewhere.")
    float_source(source_dir)
    info = read_info(source_dir)
    state = load_weights(source_dir)
    if head_from_embedding:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    parts = _by_block(state)
    release = _PageRelease(weight_files(source_dir))
    modules: dict[str, dict[str, Any]] = {}
    target.parent.mkdir(parents=True, exist_ok=True)
    with CheckpointWriter(target, expected_tensors=3 * len(state)) as writer:
        writer.require(quantized_size(sum(t.numel() for t in state.values()), 8 if qconfig.mode == "int8" else 4),
                       f"The checkpoint {target.name}")
        for step, part in enumerate(parts):
            index = None if step == 0 else int(next(iter(part)).split(".")[2])
            quantized = quantize_block(Block(index, part))
            for name, tensor in part.items():
                owner, _, kind = name.rpartition(".")
                if owner in quantized:
                    if kind == "weight":
                        continue
                    if kind != "bias":
                        raise CheckpointError(f"{source_dir} has an unexpected tensor {name} in a quantized module.")
                if name == "lm_head.weight" and head_from_embedding:
                    continue  # the tied table: stored once, as the embedding
                writer.add_tensor(name, tensor)
            for owner, qw in quantized.items():
                if owner + ".weight" not in part:
                    raise ValueError(f"the quantizer returned {owner}, which this block does not hold")
                for key, value in qw.tensors(owner + ".").items():
                    writer.add_tensor(key, value)
                modules[owner] = qw.meta()
            release(part.values())
            if progress:
                progress(step + 1, len(parts), "the embedding and head" if index is None else f"block {index}")
        del state, parts
        _copy_side_files(source_dir, writer.partial)
        qconfig.modules = modules
        provenance = {
            **{k: v for k, v in info.provenance.items() if k != "files"},
            "quantized_from": str(source_dir.resolve()),
        }
        path = writer.commit(info.config, provenance, qconfig)
    return QuantizeResult(path, _size(weight_files(source_dir)), _size(weight_files(path)),
                          time.perf_counter() - start, qconfig)


def _copy_side_files(source_dir: Path, partial: Path) -> None:
    """Tokenizer, generation and chat files travel unchanged; weights, the index and the
    configs are written anew."""
    skip = {CONFIG_FILE, INDEX_FILE, QUANT_CONFIG_FILE}
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and path.name not in skip and path.suffix != ".safetensors":
            shutil.copyfile(path, partial / path.name)


def quantized_size(parameters: int, bits: int) -> int:
    """About the bytes `parameters` take quantized to `bits` with their scales (a floor
    where some stay float, e.g. the embedding: the disk check before writing is a floor)."""
    return int(parameters * bits / 8 * 1.0625)


def _size(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)
