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
    data = read_json(path, required=True)
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path} is corrupt (its format_version is {version!r}).")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{checkpoint_dir} was written by a newer parrot (format {version}); upgrade parrot."
        )
    config = Config.from_dict(data.get("config"), where=str(path))
    provenance = data.get("provenance")
    from parrot_cli.quantize.qconfig import read_quantization_config

    stored = read_quantization_config(Path(checkpoint_dir))
    return CheckpointInfo(
        config, version, provenance if isinstance(provenance, dict) else {}, stored.to_dict() if stored else None
    )


def weight_files(checkpoint_dir: Path) -> list[Path]:
    d = Path(checkpoint_dir)
    if (d / INDEX_FILE).is_file():
        return [d / n for n in shard_names(d / INDEX_FILE)]
    if (d / WEIGHTS_FILE).is_file():
        return [d / WEIGHTS_FILE]
    raise CheckpointError(f"{d} has no weights ({WEIGHTS_FILE} is missing).")


def shard_names(index_path: Path) -> list[str]:
    """The shard files a safetensors index (model.safetensors.index.json) names, each a
    plain file name beside the index: an index must not send the reader elsewhere."""
    index = read_json(index_path, required=True)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} is corrupt (no weight_map table).")
    names = set(weight_map.values())
    for name in names:
        if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name or name.startswith("."):
            raise CheckpointError(f"{index_path} is corrupt: {name!r} is not a shard file name beside it.")
    return sorted(names)


# Bounds for a safetensors header: far above any real checkpoint (a 400B model's header
# is ~1 MB with ~2k tensors of at most 4 dimensions), far below what would exhaust memory.
MAX_HEADER_BYTES = 100 * 1024**2
MAX_DIMS = 16
MAX_DIM = 2**40


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(tensor table, byte offset of the data section), validated against the file size.

    Every entry is checked before anything trusts it: a known dtype, a shape of
    non-negative integers, and offsets that lie inside the data section and hold exactly
    shape x dtype bytes. A failure is one CheckpointError naming the file and the tensor."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header).")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path} is corrupt or truncated: its safetensors header claims {n} bytes, "
                    f"but the file has {size - 8} after the length field."
                )
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err.strerror or err}.") from err
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path} is corrupt (unreadable safetensors header).") from err
    if not isinstance(table, dict):
        raise CheckpointError(f"{path} is corrupt (safetensors header is not a table).")
    data_size = size - 8 - n
    for name, entry in table.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise CheckpointError(f"{path} is corrupt (its __metadata__ is not a table).")
            continue
        _check_entry(path, name, entry, data_size)
    return table, 8 + n


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false load as bool, a subclass of int


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    """One tensor entry of a safetensors header is well-formed and inside the file."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt: tensor {name!r} {what}.")

    if not isinstance(entry, dict):
        raise bad("has no entry table")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise bad(f"has dtype {dtype!r}; parrot reads {', '.join(DTYPE_SIZES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad(f"has invalid data offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end:
        raise bad(f"has invalid data offsets {offsets!r}")
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} ends at byte {end} of the data, which has {data_size}."
        )
    numel = 1
    for d in shape:
        numel *= d
    if end - start != numel * DTYPE_SIZES[dtype]:
        raise bad(f"has {end - start} bytes, but its shape {shape} of {dtype} needs {numel * DTYPE_SIZES[dtype]}")


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
        raise CheckpointError(f"{path} is not readable JSON ({_one_line(exc)}).") from exc
    except RecursionError as exc:  # "[[[[..." nested deeper than the parser's stack
        raise CheckpointError(f"{path} is not readable JSON (nested too deeply).") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    return data


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def hash_file(h: Any, path: Path, chunk: int = 8 * 1024**2) -> Any:
    """Feed a file into a hashlib object in chunks (weights do not fit in memory twice)."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: Path) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()
