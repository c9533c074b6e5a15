"""The one settings resolver every command and the Python API use.

Order, first wins: an explicit flag/argument > a `PARROT_<NAME>` environment variable >
the user's `config.toml` > the checkpoint's `generation_config.json` > built-in defaults.
Each setting is declared once below (type, default, help); the CLI takes its help text
from here, so a default never exists twice. No torch import here.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parrot_cli.errors import CheckpointError, UsageError
from parrot_cli.paths import config_file
from parrot_cli.quantize import modes_help

PRECISIONS = ("bf16-true", "16-true", "32-true")
CHECKPOINT_SOURCE = "generation_config.json"


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _optional_int(value: Any) -> int | None:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return int(value)


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    # Key in a checkpoint's generation_config.json that supplies a default, if any.
    checkpoint_key: str | None = None


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("model", str, None, "Model name, alias or checkpoint directory."),
        Setting("precision", str, None, f"Weights and activations: {', '.join(PRECISIONS)}. "
                "Default: bf16-true where the device computes bf16 natively, else 32-true (CPU) or 16-true (GPU)."),
        Setting("device", str, "auto", "cpu, cuda, cuda:N, mps or auto."),
        Setting("threads", _optional_int, None, "CPU threads for torch (default: torch's choice)."),
        Setting("quantize", str, None, f"Quantize the weights while loading: {modes_help()}."),
        Setting("group_size", _optional_int, None,
                "int4 group size: inputs sharing one scale and zero (32, 64, 128 or 256; default: "
                "the largest of 128/64/32 dividing every layer, 32 for weights from a 4-bit GGUF)."),
        Setting("quantize_head", _bool, False,
                "Quantize the output head (lm_head) too; it otherwise stays in the working precision."),
        Setting("max_seq_length", _optional_int, None,
                "KV cache size in tokens (default: prompt + max-new-tokens, capped by the context)."),
        Setting("compile", _bool, False, "Compile the decode step with torch.compile."),
        Setting("strategy", str, None,
                "Split the model over --devices: tp (heads and MLP split; lowest latency), "
                "sequential (each device a slice of the layers; works across nodes and for any "
                "head count) or fsdp (weights sharded and gathered again for every token: it "
                "trades speed for memory). Default with --devices N > 1: tp when the heads split "
                "evenly, else sequential."),
        Setting("devices", _optional_int, None,
                "Devices to split the model over: GPUs on CUDA; on CPU processes, each with its "
                "share of the cores (--threads sets each one's threads). Default: 1, or torchrun's "
                "world size, or every GPU with --strategy on CUDA."),
        Setting("cpu_offload", _bool, False,
                "With --strategy fsdp: keep the weight shards in CPU memory, copied to the device "
                "block by block (least device memory, slowest)."),
        Setting("dist_backend", str, "auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), gloo or nccl."),
        Setting("dist_timeout", float, 60.0,
                "Seconds a rank waits for the others in a collective before all stop (raise it "
                "for very long prompts on slow devices)."),
        Setting("max_new_tokens", int, 256, "Most tokens to generate.", "max_new_tokens"),
        Setting("temperature", float, 0.8, "Sampling temperature; 0 = greedy.", "temperature"),
        Setting("top_k", _optional_int, 50, "Sample from the k most likely tokens (0 = all).", "top_k"),
        Setting("top_p", float, 1.0, "Nucleus sampling: smallest set with this total probability.", "top_p"),
        Setting("min_p", float, 0.0, "Drop tokens below min_p x the top token's probability.", "min_p"),
        Setting("repetition_penalty", float, 1.0, "Penalise tokens already in the context (>1).",
                "repetition_penalty"),
        Setting("seed", _optional_int, None, "Random seed for reproducible sampling."),
    ]
}


def env_name(name: str) -> str:
    return "PARROT_" + name.upper()


def load_config_toml(path: Path | None = None) -> dict[str, Any]:
    """The user's config.toml as a flat dict ({} when absent). Unknown keys are an error so
    that a typo does not silently do nothing."""
    path = path or config_file()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid TOML ({err}).") from err
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise UsageError(
            f"{path}: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}."
        )
    return data


class Settings:
    """Resolved values; `source(name)` tells where each came from (for `/show` and errors)."""

    def __init__(
        self,
        flags: dict[str, Any] | None = None,
        checkpoint_defaults: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._flags = {k: v for k, v in (flags or {}).items() if v is not None}
        self._config = load_config_toml() if config is None else config
        self._checkpoint = checkpoint_defaults or {}

    def with_checkpoint(self, generation_config: dict[str, Any]) -> Settings:
        return Settings(self._flags, generation_config, self._config)

    def with_flags(self, **flags: Any) -> Settings:
        return Settings({**self._flags, **flags}, self._checkpoint, self._config)

    def source(self, name: str) -> str:
        return self._lookup(name)[1]

    def get(self, name: str) -> Any:
        return self._lookup(name)[0]

    def _lookup(self, name: str) -> tuple[Any, str]:
        setting = SETTINGS[name]
        if name in self._flags:
            return self._parse(setting, self._flags[name], "option"), "flag"
        env = os.environ.get(env_name(name))
        if env is not None and env != "":
            return self._parse(setting, env, env_name(name)), "env"
        if name in self._config:
            return self._parse(setting, self._config[name], f"{config_file()} {name}"), "config"
        key = setting.checkpoint_key
        if key and self._checkpoint.get(key) is not None:
            return self._parse(setting, self._checkpoint[key], CHECKPOINT_SOURCE), "checkpoint"
        return setting.default, "default"

    @staticmethod
    def _parse(setting: Setting, value: Any, where: str) -> Any:
        try:
            return setting.parse(value)
        except (TypeError, ValueError, OverflowError) as err:
            if where == CHECKPOINT_SOURCE:  # a checkpoint's file, not something the user typed
                raise CheckpointError(f"The checkpoint's {where} sets {setting.name} to {value!r}, which is not valid.") from err
            raise UsageError(f"Invalid value {value!r} for {setting.name} ({where}).") from err
