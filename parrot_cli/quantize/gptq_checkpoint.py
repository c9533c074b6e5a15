"""`parrot quantize gptq`: a float parrot checkpoint -> a GPTQ checkpoint on disk.

The checks come first (a quantized source, a group size the model cannot take, a
calibration text too short: one sentence each, before a weight is read); then the
calibration windows are cut, the blocks quantized one by one (`gptq_model.gptq_blocks`)
and their tensors streamed into the new checkpoint, built in `TARGET.partial/` and renamed
into place only when complete (Ctrl-C, a crash or a kill leave no half checkpoint).

Two output formats: parrot's own (`quantization_config.json` mode "gptq.int4", loaded
with no flag by `parrot generate`), or a Hugging Face GPTQ directory (`--format hf`,
written by `checkpoint/hf_gptq.py`) that transformers and gptqmodel load.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parrot_cli.checkpoint.info import read_info, weight_files
from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.quantize.gptq_model import (
    PER_CHANNEL,
    GPTQReport,
    GPTQSettings,
    Notify,
    Progress,
    check_model,
    gptq_blocks,
)
from parrot_cli.quantize.qconfig import QuantizationConfig, read_quantization_config

MODE = "gptq.int4"
FORMATS = ("parrot", "hf")


@dataclass
class GPTQOutcome:
    target: Path
    report: GPTQReport
    calibration: dict[str, Any]
    size_bytes: int


def default_output(source_dir: Path, settings: GPTQSettings, fmt: str) -> Path:
    """The sibling of the source named after it and the settings, e.g.
    SmolLM2-135M-Instruct-gptq-int4-g64 (-act for act-order, -sym, -hf)."""
    group = "gc" if settings.group_size == PER_CHANNEL else f"g{settings.group_size}"
    name = f"{source_dir.name}-gptq-int4-{group}"
    name += "-act" if settings.act_order else ""
    name += "-sym" if settings.sym else ""
    name += "-hf" if fmt == "hf" else ""
    return source_dir.parent / name


def quantize_gptq(
    source_dir: Path,
    *,
    output: Path | None = None,
    settings: GPTQSettings,
    calibration: Path | None = None,
    samples: int = 128,
    seq_len: int = 512,
    fmt: str = "parrot",
    device: str = "auto",
    precision: str | None = None,
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> GPTQOutcome:
    """Quantize the float checkpoint at `source_dir` with GPTQ; returns where it went and
    what the run measured."""
    import torch

    from parrot_cli.api import default_precision, peak_memory_bytes, pick_device, precision_dtype
    from parrot_cli.checkpoint.load import _PageRelease
    from parrot_cli.checkpoint.store import load_weights
    from parrot_cli.quantize.calibration import calibration_windows
    from parrot_cli.tokenizer import Tokenizer

    notify = notify or (lambda message: None)
    if fmt not in FORMATS:
        raise UsageError(f"Unknown --format {fmt!r}; choose parrot or hf.")
    info = read_info(source_dir)
    stored = read_quantization_config(source_dir)
    if stored is not None:
        origin = info.provenance.get("quantized_from") or info.provenance.get("source")
        where = f" ({origin})" if origin else ""
        raise UsageError(
            f"{source_dir} already holds {stored.summary()} weights; GPTQ needs float weights: "
            f"quantize its float source{where} instead."
        )
    config = info.config
    check_model(config, settings)
    if seq_len > config.block_size:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's context ({config.block_size} tokens).")
    dev = pick_device(device)
    dtype = precision_dtype(precision or default_precision(dev))
    target = Path(output).expanduser() if output else default_output(Path(source_dir), settings, fmt)
    if target.resolve() == Path(source_dir).resolve():
        raise UsageError("--output must not be the source checkpoint itself.")
    if not (Path(source_dir) / "tokenizer.json").is_file():
        raise CheckpointError(f"{source_dir} has no tokenizer.json, which calibration needs to encode its text.")
    tokenizer = Tokenizer.from_dir(source_dir)
    calib = calibration_windows(tokenizer, samples, seq_len, calibration)
    if calib.note:
        notify(calib.note)

    report = GPTQReport(settings)
    state = load_weights(source_dir)
    release = _PageRelease(weight_files(source_dir))
    entries = gptq_blocks(config, state, calib.windows, settings, dev, dtype, report,
                          progress=progress, notify=notify, release=release)
    details = {
        "bits": 4,
        "group_size": settings.group_size,
        "sym": settings.sym,
        "act_order": settings.act_order,
        "damp": settings.damp,
        "calibration": calib.to_dict(),
        "precision": str(dtype).removeprefix("torch."),
        "device": dev.type,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        from parrot_cli.checkpoint.hf_gptq import write_hf_gptq

        write_hf_gptq(target, Path(source_dir), config, entries, settings, details)
    else:
        _write_parrot(target, Path(source_dir), info, entries, details, report)
    report.peak_rss_bytes = peak_memory_bytes(torch.device("cpu"))  # VmHWM of this process
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    return GPTQOutcome(target, report, calib.to_dict(), size)


def _write_parrot(target: Path, source_dir: Path, info, entries, details: dict[str, Any], report: GPTQReport) -> None:
    from parrot_cli.checkpoint.hub import TOKENIZER_FILES
    from parrot_cli.checkpoint.store import CheckpointWriter
    from parrot_cli.quantize.format import QuantizedWeight
    from parrot_cli.quantize.save import quantized_size

    modules: dict[str, dict[str, Any]] = {}
    with CheckpointWriter(target) as writer:
        writer.require(quantized_size(info.config.num_parameters(), 4), f"The checkpoint {target.name}")
        for name, value in entries:
            if isinstance(value, QuantizedWeight):
                module = name.removesuffix(".weight")
                for key, tensor in value.tensors(module + ".").items():
                    writer.add_tensor(key, tensor)
                modules[module] = {**value.meta(), "mode": MODE}
            else:
                writer.add_tensor(name, value)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, writer.partial / name)
        provenance = {
            "source": info.provenance.get("source", str(source_dir.resolve())),
            "format": "parrot-gptq",
            "quantized_from": str(source_dir.resolve()),
            "quantized_from_files": dict(info.provenance.get("files") or {}),
        }
        qconfig = QuantizationConfig(MODE, "gptq", modules, {**details, **report.details()})
        writer.commit(info.config, provenance, quantization=qconfig)


def describe_outcome(outcome: GPTQOutcome) -> str:
    """The one-paragraph summary `parrot quantize gptq` prints."""
    r = outcome.report
    ratio = r.mean_error / r.mean_rtn_error if r.mean_rtn_error else float("nan")
    minutes, seconds = divmod(int(round(r.seconds)), 60)
    peak = [f"{r.peak_rss_bytes / 1e9:.2f} GB RSS"] if r.peak_rss_bytes else []
    if r.peak_device_bytes is not None:
        peak.append(f"{r.peak_device_bytes / 1e9:.2f} GB on the GPU")
    lines = [
        f"GPTQ {r.settings.describe()}: {r.blocks} blocks, {len(r.layers)} layers in {minutes}m{seconds:02d}s "
        f"on {outcome.calibration['samples']} x {outcome.calibration['seq_len']} calibration tokens.",
        f"Mean relative output error {r.mean_error:.4f}, against {r.mean_rtn_error:.4f} for RTN int4 at the "
        f"same group size ({ratio:.2f}x; lower in {r.better_than_rtn} of {len(r.layers)} layers).",
        f"Peak memory {', '.join(peak)}; {outcome.size_bytes / 1e6:.1f} MB on disk.",
    ]
    damped = r.damped()
    if damped:
        worst = max(damped, key=lambda layer: layer.damp)
        lines.append(f"Damping was raised for {len(damped)} layers (up to {worst.damp:g} in {worst.name}).")
    return "\n".join(lines)
