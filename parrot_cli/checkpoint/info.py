"""Reading what a parrot checkpoint is without loading its weights (and without torch):
parrot_config.json, the list of weight files, and validated safetensors headers. Listing,
locating and removing checkpoints use this; `store` adds the torch side."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parrot_cli.config import Config
from parrot_cli.errors import CheckpointError, ModelNotFoundError

FORMAT_VERSION = 1
CONFIG_FILE = "parrot_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> bytes per element
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class CheckpointInfo:
    """What parrot_config.json holds besides the architecture."""

    config: Config
    format_version: int
    provenance: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # quantization_config.json, if quantized


def read_info(checkpoint_dir: Path) -> CheckpointInfo:
    """Parse parrot_config.json; a missing or unreadable one is a clear error."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not Path(checkpoint_dir).is_dir():
        raise ModelNotFoundError(f"No checkpoint at {checkpoint_dir}.")
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint_dir} is not a parrot checkpoint (no {CONFIG_FILE}); "
            f"create one with `parrot convert SOURCE`."
        )
    try:
        data = json.loads(path.read_text())
        version = int(data["format_version"])
        config = Config.from_dict(data["config"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt ({err}).") from err
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{checkpoint_dir} was written by a newer parrot (format {version}); upgrade parrot."
        )
    from parrot_cli.quantize.qconfig import read_quantization_config

    stored = read_quantization_config(Path(checkpoint_dir))
    return CheckpointInfo(config, version, data.get("provenance", {}), stored.to_dict() if stored else None)


def weight_files(checkpoint_dir: Path) -> list[Path]:
    d = Path(checkpoint_dir)
    if (d / INDEX_FILE).is_file():
        try:
            index = json.loads((d / INDEX_FILE).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{d / INDEX_FILE} is corrupt ({err}).") from err
        return [d / n for n in names]
    if (d / WEIGHTS_FILE).is_file():
        return [d / WEIGHTS_FILE]
    raise CheckpointError(f"{d} has no weights ({WEIGHTS_FILE} is missing).")


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor table, byte offset of the data section), validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header).")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 1024**2):
            raise CheckpointError(f"{path} is corrupt or truncated (bad safetensors header length).")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{path} is corrupt (unreadable safetensors header).") from err
    if not isinstance(table, dict):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not a table).")
    data_size = size - 8 - n
    for name, entry in table.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            itemsize = DTYPE_SIZES[entry["dtype"]]
            numel = 1
            for d in entry["shape"]:
                numel *= int(d)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is corrupt (bad entry for tensor {name!r}).") from err
        if end > data_size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends past the end of the file."
            )
        if not 0 <= start <= end or end - start != numel * itemsize:
            raise CheckpointError(f"{path} is corrupt (tensor {name!r} has inconsistent size).")
    return table, 8 + n


def read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    """Read a JSON object file of a checkpoint; a missing optional file reads as `{}`.

    Every failure becomes a `CheckpointError` naming the file, because the user's fix is the
    same in all cases: re-download or re-convert the checkpoint.
    """
    if not path.is_file():
        if required:
            raise CheckpointError(f"The checkpoint at {path.parent} has no {path.name}.")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    return data


def hash_file(h: Any, path: Path, chunk: int = 8 * 1024**2) -> Any:
    """Feed a file into a hashlib object in chunks (weights do not fit in memory twice)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: Path) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()
