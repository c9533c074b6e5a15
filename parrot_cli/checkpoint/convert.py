"""`parrot convert`: a Hugging Face directory, a GGUF file or a known model's source ->
a parrot checkpoint. Reads are memory-mapped and tensors stream through one layer at a
time into the writer, so peak memory stays about one copy of the weights (at most one
output shard), and the result appears atomically (see `store.CheckpointWriter`)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from parrot_cli.checkpoint.hf import (
    TensorSource,
    convert_weights,
    expected_tensor_count,
    open_hf_weights,
    read_hf_config,
)
from parrot_cli.checkpoint.hf_gptq import GPTQTensorSource, read_gptq_config
from parrot_cli.checkpoint.hub import TOKENIZER_FILES
from parrot_cli.checkpoint.info import read_json, sha256_file
from parrot_cli.checkpoint.store import CheckpointWriter, Progress
from parrot_cli.config import Config, KnownModel, find_known
from parrot_cli.errors import CheckpointError, ModelNotFoundError, UsageError
from parrot_cli.paths import checkpoints_root
from parrot_cli.quantize.format import QuantizedWeight
from parrot_cli.quantize.qconfig import QuantizationConfig

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_output(source: str | Path, known: KnownModel | None = None) -> Path:
    """Where a conversion lands when --output is not given: ROOT/org/name for a known
    model (also when a local directory path ends with its hub id), else ROOT/local/NAME."""
    if known is not None:
        return checkpoints_root() / known.name
    path = Path(source)
    parts = path.resolve().parts
    if len(parts) >= 2:
        match = find_known(f"{parts[-2]}/{parts[-1]}")
        if match is not None:
            return checkpoints_root() / match.name
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return checkpoints_root() / "local" / re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)


def target_for(source: str | Path, output: Path | None = None) -> Path:
    """Where `convert(source, output)` writes, without fetching or reading anything."""
    if output is not None:
        return Path(output).expanduser()
    path = Path(source).expanduser()
    return default_output(path, None if path.exists() else find_known(str(source)))


def convert(
    source: str | Path,
    output: Path | None = None,
    *,
    dtype: str = "auto",
    progress: Progress | None = None,
    source_label: str | None = None,
) -> Path:
    """Convert SOURCE and return the checkpoint directory. `source_label` is recorded as the
    provenance "source" (e.g. `hub:ORG/NAME@COMMIT` from `parrot download`, which compares
    it to tell an up-to-date checkpoint) instead of the local path it was converted from."""
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    known = None
    path = Path(source).expanduser()
    if not path.exists():
        known = find_known(str(source))
        if known is None:
            raise ModelNotFoundError(f"{source} does not exist.")
        if not known.sources:
            raise ModelNotFoundError(
                f"{known.name} has no source parrot can fetch yet; convert a local copy "
                f"with `parrot convert PATH`."
            )
        from parrot_cli.checkpoint.sources import fetch

        path = fetch(known.sources[0])
    target = Path(output).expanduser() if output else default_output(path, known)
    provenance: dict[str, Any] = {
        "source": source_label or (str(known.sources[0]) if known else str(path.resolve()))
    }
    from parrot_cli.machine import big_blocks_mapped

    if path.is_dir():
        with big_blocks_mapped():
            return _convert_hf(path, target, DTYPES[dtype], provenance, progress, known)
    if path.suffix == ".gguf" or _is_gguf(path):
        with big_blocks_mapped():
            return _convert_gguf(path, target, DTYPES[dtype], provenance, progress, known)
    raise CheckpointError(
        f"{path} is neither a Hugging Face checkpoint directory nor a .gguf file."
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _cast(tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None):
    """Float tensors to `dtype`; quantized weights stay as they are."""
    for name, t in tensors:
        cast = dtype is not None and not isinstance(t, QuantizedWeight) and t.is_floating_point()
        yield name, (t.to(dtype) if cast else t)


def _write(
    target: Path,
    config: Config,
    tensors: Iterator[tuple[str, torch.Tensor | QuantizedWeight]],
    total: int,
    files: dict[str, Any],
    provenance: dict[str, Any],
    progress: Progress | None,
    quantization: QuantizationConfig | Callable[[], QuantizationConfig | None] | None = None,
) -> Path:
    """Stream tensors into a new checkpoint; `files` maps name -> Path (copied) or data.
    A `QuantizedWeight` entry ("P.weight") is stored as P's quantized tensors, after its
    shape is checked against the config. `quantization` says what the checkpoint holds: a
    QuantizationConfig, or a callable asked once every tensor is written (a GGUF import
    knows what each tensor became only then); a config with no modules listed gets those
    written here.

    The space it needs is checked before anything is written (from the config's parameter
    count at the first tensor's width: its dtype, or a quantized weight's bits); a disk that
    fills up anyway (something else wrote) is one DiskFullError with the numbers, and the
    partial checkpoint is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shapes = _weight_shapes(config) if quantization is not None else {}
    stored: dict[str, dict[str, Any]] = {}
    need = sum(c.stat().st_size if isinstance(c, Path) else len(str(c)) for c in files.values())
    # A quantized weight is stored as up to three tensors (qweight, scales, zeros).
    with CheckpointWriter(target, expected_tensors=(3 if quantization else 1) * total) as writer:
        done = 0
        for name, t in tensors:
            if done == 0:  # the width it is written in is known now
                need += int(config.num_parameters() * _bytes_per_parameter(t))
                writer.require(need, f"The checkpoint {target.name}")
            if isinstance(t, QuantizedWeight):
                module = name.removesuffix(".weight")
                if shapes.get(name) != (t.out_features, t.in_features):
                    raise CheckpointError(
                        f"{module} is quantized as [{t.out_features}, {t.in_features}] but the config "
                        f"says {list(shapes.get(name, ()))}."
                    )
                for key, part in t.tensors(module + ".").items():
                    writer.add_tensor(key, part)
                stored[module] = t.meta()
            else:
                writer.add_tensor(name, t)
            done += 1
            if progress:
                progress(done, total, name)
        if done != total:
            raise CheckpointError(f"Expected {total} tensors, converted {done}.")
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, writer.partial / name)
            elif isinstance(content, str):
                writer.write_text(name, content)
            else:
                writer.write_json(name, content)
        qconfig = quantization() if callable(quantization) else quantization
        if qconfig is not None and not qconfig.modules:
            qconfig.modules.update({m: {**meta, "mode": qconfig.mode} for m, meta in stored.items()})
        return writer.commit(config, provenance, qconfig)


def _bytes_per_parameter(t: Any) -> float:
    """Bytes a parameter takes on disk, judged by one tensor: its element size, or for a
    quantized weight its bits plus the scales (~1/16 more at 4 bits in groups of 32)."""
    if isinstance(t, QuantizedWeight):
        return t.bits / 8 * 1.0625
    return t.element_size()


def _weight_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    from parrot_cli.checkpoint.load import meta_model

    return {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}


def _generation_config(source_dir: Path | None, config: Config) -> dict[str, Any]:
    """The source's generation_config.json with eos_token_id normalised to a list."""
    data = read_json(source_dir / "generation_config.json") if source_dir is not None else {}
    eos = data.get("eos_token_id", config.eos_token_id)
    eos = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
    if not all(type(i) is int and 0 <= i < config.vocab_size for i in eos):
        raise CheckpointError(
            f"{source_dir / 'generation_config.json'} lists eos_token_id {data.get('eos_token_id')!r}; "
            f"it must hold token ids below the vocabulary size {config.vocab_size}."
        )
    for extra in config.eos_token_id:
        if extra not in eos:
            eos.append(extra)
    data["eos_token_id"] = eos
    if config.bos_token_id is not None:
        data.setdefault("bos_token_id", config.bos_token_id)
    return data


def _convert_hf(
    src_dir: Path,
    target: Path,
    dtype: torch.dtype | None,
    provenance: dict[str, Any],
    progress: Progress | None,
    known: KnownModel | None,
) -> Path:
    hf = read_hf_config(src_dir)
    config = Config.from_hf(hf, name=known.name if known else target.name, where=str(src_dir / "config.json"))
    generation = _generation_config(src_dir, config)
    config.eos_token_id = generation["eos_token_id"]
    weights = open_hf_weights(src_dir)
    gptq = read_gptq_config(src_dir, hf)
    quantization = None
    if gptq is not None:  # stays int4: decoded into parrot's layout, never dequantized
        weights = GPTQTensorSource(weights, gptq)
        quantization = QuantizationConfig("gptq.int4", "hf-gptq", {}, gptq.details())
    files: dict[str, Any] = {n: src_dir / n for n in TOKENIZER_FILES if (src_dir / n).is_file()}
    files["generation_config.json"] = generation
    provenance.update(
        {
            "format": "huggingface-gptq" if gptq else "huggingface",
            "revision": _hf_revision(src_dir),
            "source_files": {
                p.name: sha256_file(p)
                for p in sorted(src_dir.iterdir())
                if p.suffix in (".safetensors", ".bin", ".json")
            },
        }
    )
    tensors = _cast(convert_weights(config.family, hf, config, weights, where=str(src_dir)), dtype)
    return _write(target, config, tensors, expected_tensor_count(config), files, provenance, progress,
                  quantization)


def _hf_revision(src_dir: Path) -> str | None:
    """The commit a hub snapshot came from, when the directory says (snapshots/<sha>/)."""
    if re.fullmatch(r"[0-9a-f]{40}", src_dir.resolve().name):
        return src_dir.resolve().name
    ref = src_dir / ".git" / "HEAD"
    return ref.read_text().strip() if ref.is_file() else None


class _OrderedGGUFTensors(TensorSource):
    """Random access over GGUF's one-pass tensor stream. GGUF files store tensors layer by
    layer, so the buffer of read-ahead tensors stays about one layer (and holds only
    references to the memory map when the import keeps the blocks)."""

    def __init__(self, stream: Iterator[tuple[str, Any]]) -> None:
        super().__init__({})
        self._stream = stream
        self._buffer: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        while name not in self._buffer:
            try:
                key, t = next(self._stream)
            except StopIteration:
                raise CheckpointError(f"The GGUF file has no tensor for {name!r}.") from None
            self._buffer[key] = t
        return self._buffer.pop(name)


def _convert_gguf(
    path: Path,
    target: Path,
    dtype: torch.dtype | None,
    provenance: dict[str, Any],
    progress: Progress | None,
    known: KnownModel | None,
) -> Path:
    """A GGUF file -> a checkpoint that keeps its quantized tensors quantized
    (`checkpoint/gguf_quant.py`), or with `dtype` a float checkpoint of the dequantized
    weights."""
    from parrot_cli.checkpoint.gguf import read_gguf

    gguf = read_gguf(path)
    config = Config.from_hf(gguf.hf_config, name=known.name if known else target.name, where=str(path))
    generation = dict(gguf.generation_config)
    config.eos_token_id = list(generation.get("eos_token_id") or config.eos_token_id)
    files: dict[str, Any] = {
        "tokenizer.json": gguf.tokenizer_json,
        "tokenizer_config.json": gguf.tokenizer_config,
        "generation_config.json": generation,
    }
    provenance.update(
        {
            "format": "gguf",
            "gguf_metadata": gguf.metadata,
            "dequantized": dtype is not None,
            "source_files": {path.name: sha256_file(path)},
        }
    )
    total = expected_tensor_count(config)
    if dtype is not None:
        src = _OrderedGGUFTensors(gguf.tensors())
        tensors = _cast(convert_weights("llama", gguf.hf_config, config, src, where=str(path)), dtype)
        return _write(target, config, tensors, total, files, provenance, progress)
    from parrot_cli.checkpoint.gguf_quant import GGUFImport

    importer = GGUFImport(gguf.metadata.get("file_type_name"))
    src = _OrderedGGUFTensors(gguf.weights())
    tensors = importer.convert(convert_weights("llama", gguf.hf_config, config, src, where=str(path)))
    return _write(target, config, tensors, total, files, provenance, progress, importer.config)
