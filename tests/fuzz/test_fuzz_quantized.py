"""Quantized checkpoints: quantization_config.json (`QuantizationConfig`) and the tensors of one
stored module (`QuantizedWeight.from_tensors`), followed the way the loader follows them: a
module packed for the kernel (`apply.stored_module`) and one forward through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from parrot_cli.quantize.apply import stored_module
from parrot_cli.quantize.qconfig import (
    QUANT_CONFIG_FILE,
    QuantizationConfig,
    read_quantization_config,
)
from tests.fuzz.conftest import clean, examples
from tests.fuzz.test_fuzz_safetensors import json_value

DTYPES = [torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32, torch.bool]
MODULE = "transformer.h.0.attn.qkv"


def random_tensor(draw: st.DrawFn, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    values = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)


@st.composite
def quantized_module(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], dict]:
    """A valid stored module (int4 with float or integer zeros, or int8; act-order or
    not), then up to three corruptions of its tensors or its config entry."""
    bits = draw(st.sampled_from([4, 8]))
    n, k = draw(st.sampled_from([1, 2, 8])), draw(st.sampled_from([32, 64, 96, 256]))
    group = draw(st.sampled_from([g for g in (32, 64, 96, 256, k) if k % g == 0]))
    zero = draw(st.sampled_from(["float", "int"]))
    p = MODULE + "."
    tensors = {p + "scales": random_tensor(draw, [n, k // group], torch.bfloat16) * 0.01}
    if bits == 4:
        tensors[p + "qweight"] = random_tensor(draw, [n, k // 2], torch.uint8)
        if zero == "int":
            tensors[p + "qzeros"] = random_tensor(draw, [n, k // group], torch.uint8) % 16
        else:
            tensors[p + "zeros"] = random_tensor(draw, [n, k // group], torch.bfloat16) * 0.01
    else:
        tensors[p + "qweight"] = random_tensor(draw, [n, k], torch.int8)
    meta: dict = {"bits": bits, "group_size": group, "mode": f"int{bits}"}
    if bits == 4:
        meta["zero"] = zero
    if draw(st.booleans()):
        tensors[p + "perm"] = torch.randperm(k, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        meta["act_order"] = True
    for _ in range(draw(st.integers(0, 3))):
        what = draw(st.sampled_from(["dtype", "shape", "drop", "add", "meta", "values"]))
        name = draw(st.sampled_from(sorted(tensors))) if tensors else None
        if what == "dtype" and name:
            tensors[name] = tensors[name].to(draw(st.sampled_from(DTYPES)))
        elif what == "shape" and name:
            shape = draw(st.lists(st.integers(0, 9), max_size=3))
            tensors[name] = random_tensor(draw, shape, tensors[name].dtype)
        elif what == "drop" and name:
            del tensors[name]
        elif what == "add":
            extra = draw(st.sampled_from(["zeros", "qzeros", "perm"]))
            shape = draw(st.lists(st.integers(0, 9), max_size=2))
            tensors[p + extra] = random_tensor(draw, shape, draw(st.sampled_from(DTYPES)))
        elif what == "meta":
            meta[draw(st.sampled_from(["bits", "group_size", "zero", "act_order", "mode"]))] = draw(
                st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, -32, 10**9, True, "4", "int", "float"]), json_value))
        elif what == "values" and name:
            t = tensors[name]
            big = torch.full_like(t, 255 if t.dtype == torch.uint8 else (-1 if t.dtype != torch.bool else 1))
            tensors[name] = big if t.is_floating_point() is False else t * float("inf")
    return tensors, meta


def use(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """What loading a stored-quantized Linear does, then one forward through it."""
    module = stored_module(MODULE, tensors, meta, None, torch.device("cpu"), torch.float32)
    x = torch.randn(1, module.in_features)
    module(x.to(torch.bfloat16))


@given(case=quantized_module())
@examples(ci=300)
def test_stored_quantized_modules_load_cleanly(case) -> None:
    tensors, meta = case
    clean("quantized weights: from_tensors + kernel + forward", lambda: use(tensors, meta))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qconfig-fuzz")


VALID = QuantizationConfig("int4", "rtn", {MODULE: {"bits": 4, "group_size": 32, "zero": "float"}}).to_dict()


@st.composite
def qconfig_text(draw: st.DrawFn) -> str:
    data = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from([*data, "modules.entry", "extra"]))
        if key == "modules.entry" and isinstance(data.get("modules"), dict):
            data["modules"][draw(st.text(max_size=12))] = draw(json_value)
        else:
            data[key] = draw(json_value)
    text = json.dumps(data)
    if draw(st.integers(0, 4)) == 0:
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=4)) + text[cut + 1:]
    return text


@given(text=qconfig_text())
@examples(ci=300)
def test_quantization_configs_read_cleanly(scratch: Path, text: str) -> None:
    (scratch / QUANT_CONFIG_FILE).write_text(text, encoding="utf-8")

    def read() -> None:
        config = read_quantization_config(scratch)
        if config is not None:
            config.summary()

    clean("quantization_config.json", read)
