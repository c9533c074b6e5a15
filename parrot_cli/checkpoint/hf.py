"""Hugging Face checkpoints -> parrot weight names.

Reads a transformers checkpoint directory (model.safetensors, sharded safetensors with an
index, or pytorch_model*.bin read only through `torch.load(weights_only=True)`), lazily and
memory-mapped, and yields parrot tensors layer by layer so peak memory stays about one
layer plus the output shard being written.

Fused attention weights differ per family; each is re-laid out to parrot's [q; k; v] rows:
  GPT-NeoX, Falcon (classic MHA): per head [q, k, v] interleaved
  Falcon multi-query:             [q heads..., k, v]
  Falcon new decoder arch:        per kv group [q x (heads/groups), k, v]

A Linear's weight may also come as a `QuantizedWeight` (a GPTQ import, `hf_gptq.py`): the
same mappers fuse its parts (`_cat`) and re-lay out its rows (`_relayout`), which moves
each output row's codes, scales and zero points together, so it stays quantized.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from parrot_cli.config import Config
from parrot_cli.errors import CheckpointError, is_out_of_memory
from parrot_cli.quantize.format import QuantizedWeight

Getter = Callable[[str], torch.Tensor]


class TensorSource:
    """Random access to the tensors of a checkpoint without loading them all."""

    def __init__(self, tensors: dict[str, Getter | torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> set[str]:
        return set(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        try:
            entry = self._tensors[name]
        except KeyError:
            raise CheckpointError(f"The checkpoint has no tensor {name!r}.") from None
        return entry() if callable(entry) else entry


def read_hf_config(source_dir: Path) -> dict[str, Any]:
    path = Path(source_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{source_dir} has no config.json; is it a Hugging Face checkpoint?")
    from parrot_cli.checkpoint.info import read_json

    return read_json(path, required=True)


def open_hf_weights(source_dir: Path) -> TensorSource:
    """Safetensors when present (preferred: no pickle), else .bin files via weights_only."""
    from parrot_cli.checkpoint.info import shard_names
    from parrot_cli.checkpoint.store import load_safetensors

    d = Path(source_dir)
    st_files = sorted(d.glob("*.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = shard_names(index)
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise CheckpointError(f"{d} is incomplete: shard {missing[0]} is missing.")
        st_files = [d / n for n in names]
    if st_files:
        tensors: dict[str, Any] = {}
        for f in st_files:
            tensors.update(load_safetensors(f))
        return TensorSource(tensors)
    bin_files = sorted(d.glob("pytorch_model*.bin")) or sorted(d.glob("*.pth"))
    if not bin_files:
        raise CheckpointError(f"{d} has no weights (*.safetensors or pytorch_model*.bin).")
    tensors = {}
    for f in bin_files:
        tensors.update(load_pickled_weights(f))
    return TensorSource(tensors)


def load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin`/`.pth` state dict, read only through `torch.load(weights_only=True)`: a
    pickle is a program, and this refuses every one that would call anything but tensor
    constructors (the payload never runs). Memory-mapped when the file is in torch's zip
    format; pre-2020 (legacy) files are read into memory."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it would call {found[1]})" if found else ""
        raise CheckpointError(
            f"Refused to load {path}: it holds more than tensors{what}, and parrot loads pickles only "
            "with torch.load(weights_only=True); use the model's safetensors files instead."
        ) from err
    except Exception as err:  # torch raises many types for a damaged file
        if is_out_of_memory(err):
            raise
        raise CheckpointError(
            f"{path} could not be read safely ({type(err).__name__}: {' '.join(str(err).split())[:200]})."
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} is not a state dict of named tensors.")
    return state


# --------------------------------------------------------------------------- mapping


def convert_weights(
    family: str, hf: dict[str, Any], config: Config, src: TensorSource, where: str = "The checkpoint"
) -> Iterator[tuple[str, Any]]:
    """Yield (parrot name, tensor) in model order, each checked against the config: the
    shape its sizes give, a floating-point dtype, finite values (a quantized weight: its
    shape and its codes' ranges). A config.json whose sizes
    disagree with its weights fails here (one CheckpointError naming `where`), never as a
    checkpoint that looks whole but cannot load."""
    expected = expected_shapes(config)
    mapped = _MAPPERS[family](hf, config, src)
    while True:
        try:
            name, tensor = next(mapped)
        except StopIteration:
            return
        except RuntimeError as err:  # a re-layout (reshape, cat) of a tensor of the wrong size
            if is_out_of_memory(err):
                raise
            raise CheckpointError(
                f"{where}: the weights do not match the config's sizes ({' '.join(str(err).split())})."
            ) from err
        want = expected.get(name)
        if want is None:
            raise CheckpointError(f"{where}: parrot made an unexpected tensor {name}.")
        shape = _shape_of(tensor)
        if shape != want:
            raise CheckpointError(
                f"{where}: the weights do not match the config's sizes: {name} is {list(shape)}, "
                f"but the config makes it {list(want)}."
            )
        if isinstance(tensor, QuantizedWeight):
            tensor.check_values(name.removesuffix(".weight"))
        if not isinstance(tensor, torch.Tensor):
            yield name, tensor  # quantized, or still in GGUF blocks: checked as it is decoded
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"{where}: {name} holds {tensor.dtype} values, not floating-point weights.")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: {name} holds NaN or infinite values.")
        yield name, tensor


def _shape_of(weight: Any) -> tuple[int, ...]:
    """The logical [out, in] shape of a float tensor, a QuantizedWeight or GGUF blocks."""
    if isinstance(weight, QuantizedWeight):
        return (weight.out_features, weight.in_features)
    return tuple(weight.shape)


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model `config` describes (built on the meta device:
    no memory; the config's bounds keep it quick). The tied head is not a tensor of its own."""
    from parrot_cli.checkpoint.load import meta_model

    shapes = {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _get_linear(src: TensorSource, prefix: str, bias: bool) -> Iterator[tuple[str, torch.Tensor]]:
    yield "weight", src.get(prefix + ".weight")
    if bias:
        yield "bias", src.get(prefix + ".bias")


def _norm(src: TensorSource, hf_prefix: str, out_prefix: str, config: Config):
    yield f"{out_prefix}.weight", src.get(hf_prefix + ".weight")
    if config.norm_class == "LayerNorm":
        yield f"{out_prefix}.bias", src.get(hf_prefix + ".bias")


def _cat(parts: list, what: str) -> Any:
    """[q; k; v] or [gate; up] from separate modules, stacked by rows: float tensors with
    torch.cat; quantized ones (which must agree on group size and act-order permutation to
    run as one matrix) and weights still in another layout (a GGUF import's raw blocks)
    through their own `cat_rows`."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    kind = type(parts[0])
    if not all(type(p) is kind for p in parts):
        raise CheckpointError(f"{what}: some of its parts are quantized and some are not; parrot fuses them.")
    try:
        return kind.cat_rows(parts)
    except ValueError as err:
        raise CheckpointError(
            f"{what}: its parts cannot run fused ({err}); with act-order they need the same g_idx."
        ) from None


def _relayout(t, relayout, config: Config):
    """Apply a row re-layout to a float tensor or to a QuantizedWeight (by index)."""
    if isinstance(t, QuantizedWeight):
        return t.select_rows(relayout(torch.arange(t.out_features), config))
    return relayout(t, config)


def _head(src: TensorSource, config: Config, hf_name: str):
    if not config.tie_embeddings:
        yield "lm_head.weight", src.get(hf_name)


def _llama(hf: dict[str, Any], config: Config, src: TensorSource):
    yield "transformer.wte.weight", src.get("model.embed_tokens.weight")
    for i in range(config.n_layer):
        p, o = f"model.layers.{i}", f"transformer.h.{i}"
        yield from _norm(src, f"{p}.input_layernorm", f"{o}.norm_1", config)
        yield from _norm(src, f"{p}.post_attention_layernorm", f"{o}.norm_2", config)
        a = f"{p}.self_attn"
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            parts = [src.get(f"{a}.{n}_proj.{kind}") for n in "qkv"]
            yield f"{o}.attn.qkv.{kind}", _cat(parts, f"{a} q/k/v_proj")
        for kind, t in _get_linear(src, f"{a}.o_proj", config.proj_bias):
            yield f"{o}.attn.proj.{kind}", t
        m = f"{p}.mlp"
        for kind in ("weight", "bias") if config.mlp_bias else ("weight",):
            parts = [src.get(f"{m}.gate_proj.{kind}"), src.get(f"{m}.up_proj.{kind}")]
            yield f"{o}.mlp.fc.{kind}", _cat(parts, f"{m} gate/up_proj")
        for kind, t in _get_linear(src, f"{m}.down_proj", config.mlp_bias):
            yield f"{o}.mlp.proj.{kind}", t
    yield from _norm(src, "model.norm", "transformer.ln_f", config)
    yield from _head(src, config, "lm_head.weight")


def split_interleaved(t: torch.Tensor, config: Config) -> torch.Tensor:
    """Per head [q, k, v] (NeoX, classic Falcon) -> [q_all; k_all; v_all]."""
    hs, n = config.head_size, config.n_head
    rest = t.shape[1:]
    t = t.reshape(n, 3, hs, *rest).transpose(0, 1)
    return t.reshape(3 * n * hs, *rest)


def split_grouped(t: torch.Tensor, config: Config) -> torch.Tensor:
    """Per kv group [q x per_group, k, v] (Falcon new arch and multi-query with 1 group)."""
    hs, g = config.head_size, config.n_query_groups
    per = config.n_head // g
    rest = t.shape[1:]
    t = t.reshape(g, per + 2, hs, *rest)
    q = t[:, :per].reshape(g * per * hs, *rest)
    k = t[:, per].reshape(g * hs, *rest)
    v = t[:, per + 1].reshape(g * hs, *rest)
    return torch.cat((q, k, v))


def _neox(hf: dict[str, Any], config: Config, src: TensorSource):
    yield "transformer.wte.weight", src.get("gpt_neox.embed_in.weight")
    for i in range(config.n_layer):
        p, o = f"gpt_neox.layers.{i}", f"transformer.h.{i}"
        yield from _norm(src, f"{p}.input_layernorm", f"{o}.norm_1", config)
        yield from _norm(src, f"{p}.post_attention_layernorm", f"{o}.norm_2", config)
        for kind, t in _get_linear(src, f"{p}.attention.query_key_value", config.qkv_bias):
            yield f"{o}.attn.qkv.{kind}", _relayout(t, split_interleaved, config)
        for kind, t in _get_linear(src, f"{p}.attention.dense", config.proj_bias):
            yield f"{o}.attn.proj.{kind}", t
        for kind, t in _get_linear(src, f"{p}.mlp.dense_h_to_4h", config.mlp_bias):
            yield f"{o}.mlp.fc.{kind}", t
        for kind, t in _get_linear(src, f"{p}.mlp.dense_4h_to_h", config.mlp_bias):
            yield f"{o}.mlp.proj.{kind}", t
    yield from _norm(src, "gpt_neox.final_layer_norm", "transformer.ln_f", config)
    # transformers calls NeoX's head embed_out; some GPTQ tools save it as lm_head.
    yield from _head(src, config, "lm_head.weight" if "lm_head.weight" in src else "embed_out.weight")


def _falcon(hf: dict[str, Any], config: Config, src: TensorSource):
    new_arch = bool(hf.get("new_decoder_architecture")) or hf.get("model_type") == "RefinedWeb"
    multi_query = config.n_query_groups == 1 and not new_arch
    relayout = split_grouped if (new_arch or multi_query) else split_interleaved
    yield "transformer.wte.weight", src.get("transformer.word_embeddings.weight")
    for i in range(config.n_layer):
        p, o = f"transformer.h.{i}", f"transformer.h.{i}"
        if f"{p}.ln_attn.weight" in src:
            yield from _norm(src, f"{p}.ln_attn", f"{o}.norm_1", config)
            yield from _norm(src, f"{p}.ln_mlp", f"{o}.norm_2", config)
        else:
            yield from _norm(src, f"{p}.input_layernorm", f"{o}.norm_1", config)
            if not config.shared_attention_norm:
                yield from _norm(src, f"{p}.post_attention_layernorm", f"{o}.norm_2", config)
        a = f"{p}.self_attention"
        for kind, t in _get_linear(src, f"{a}.query_key_value", config.qkv_bias):
            yield f"{o}.attn.qkv.{kind}", _relayout(t, relayout, config)
        for kind, t in _get_linear(src, f"{a}.dense", config.proj_bias):
            yield f"{o}.attn.proj.{kind}", t
        for kind, t in _get_linear(src, f"{p}.mlp.dense_h_to_4h", config.mlp_bias):
            yield f"{o}.mlp.fc.{kind}", t
        for kind, t in _get_linear(src, f"{p}.mlp.dense_4h_to_h", config.mlp_bias):
            yield f"{o}.mlp.proj.{kind}", t
    yield from _norm(src, "transformer.ln_f", "transformer.ln_f", config)
    yield from _head(src, config, "lm_head.weight")


_MAPPERS = {"llama": _llama, "gpt_neox": _neox, "falcon": _falcon}


def expected_tensor_count(config: Config) -> int:
    """How many tensors `convert_weights` yields (for a progress bar total)."""
    per_norm = 2 if config.norm_class == "LayerNorm" else 1
    norms = per_norm * (1 if config.shared_attention_norm else 2)
    per_layer = norms + 2 + config.qkv_bias + config.proj_bias + 2 * (1 + config.mlp_bias)
    return 1 + config.n_layer * per_layer + per_norm + (0 if config.tie_embeddings else 1)
