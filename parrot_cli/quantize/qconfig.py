"""`quantization_config.json`: which modules of a checkpoint are quantized, and how (the
tensors themselves are described in `quantize/format.py`). No torch import: `parrot list`
and checkpoint lookups read this."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parrot_cli.errors import CheckpointError

QUANT_CONFIG_FILE = "quantization_config.json"
FORMAT_NAME = "parrot.quantized"
FORMAT_VERSION = 1
ZERO_KINDS = ("float", "int")  # P.zeros or P.qzeros (int4 only)


@dataclass
class QuantizationConfig:
    """`quantization_config.json`: which modules of a checkpoint are quantized, and how.

    `mode` is what loading the checkpoint amounts to (`int4`, `int8`, `gptq.int4`, or
    `mixed` for a GGUF import whose tensors map to different modes); `method` how the
    weights were made (`rtn`, `gguf`, `gptq`, `hf-gptq`); `modules` maps each quantized
    module to its `QuantizedWeight.meta()` (plus, for GGUF imports, the source type under
    "from", e.g. "Q4_1" or "Q4_K+Q6_K" for a fused module, and under "how" whether its values
    are the file's ("exact") or were re-quantized: "requantized", "promoted" (fused parts of
    different types), "shape" (rows the int4 kernel cannot pack)); `details` holds what the
    method wants to record (calibration, damping, a GGUF import's scale rounding...)."""

    mode: str
    method: str
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "method": self.method,
            "details": self.details,
            "modules": self.modules,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = QUANT_CONFIG_FILE) -> QuantizationConfig:
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{where} is not a parrot quantization config.")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where} was written by a newer parrot (quantized format {version}); upgrade parrot."
            )
        modules, mode, method = data.get("modules"), data.get("mode"), data.get("method")
        if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
            raise CheckpointError(f"{where} has no valid module table.")
        if not isinstance(mode, str) or not isinstance(method, str):
            raise CheckpointError(f"{where} does not say its mode and method.")
        details = data.get("details") or {}
        return cls(mode, method, modules, details if isinstance(details, dict) else {})

    def summary(self) -> str:
        """One phrase for `parrot list` and convert's summary: 'int4 g32 (120), int8 (1)'."""
        counts: dict[str, int] = {}
        for meta in self.modules.values():
            label = _label(meta)
            counts[label] = counts.get(label, 0) + 1
        parts = ", ".join(f"{label} ({n})" for label, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"{self.mode}: {parts}" if parts else self.mode

    def mapping(self) -> list[str]:
        """What each source type became, for a GGUF import (convert's summary, `parrot
        list`): ['Q4_1 -> int4 g32 x120 (exact up to bf16 scale rounding)', 'Q8_0 -> int8
        x1 (re-quantized)']; other checkpoints get their `summary()`."""
        counts: dict[tuple[str, str, str], int] = {}
        for meta in self.modules.values():
            if "from" not in meta:
                return [self.summary()]
            key = (str(meta["from"]), _label(meta), str(meta.get("how", "")))
            counts[key] = counts.get(key, 0) + 1
        lines = []
        for (source, label, how), n in sorted(counts.items(), key=lambda kv: -kv[1]):
            reason = HOW.get(how)
            lines.append(f"{source} -> {label} x{n}" + (f" ({reason})" if reason else ""))
        return lines or [self.summary()]


# Why a GGUF import's module holds what it holds (its "how" in the module table).
HOW = {
    "exact": "exact up to bf16 scale rounding",
    "requantized": "re-quantized",
    "promoted": "re-quantized to int8: its fused parts have different types",
    "shape": "re-quantized to int8: the int4 kernel needs rows in multiples of 16",
}


def _label(meta: dict[str, Any]) -> str:
    label = f"int{meta.get('bits')}"
    if meta.get("bits") == 4:
        label += f" g{meta.get('group_size')}"
    return label + (" act-order" if meta.get("act_order") else "")


def read_quantization_config(checkpoint_dir: Path) -> QuantizationConfig | None:
    """The checkpoint's quantization config, or None for a float checkpoint."""
    path = Path(checkpoint_dir) / QUANT_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}).") from err
    return QuantizationConfig.from_dict(data, str(path))
