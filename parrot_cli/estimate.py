"""`parrot estimate`: the memory each device needs for a model, from its config alone.

Nothing is downloaded or loaded: the shapes come from the architecture config (a local
checkpoint's, or the registry's copy of the model's config.json), the bytes per weight from
the quantization mode (or a quantized checkpoint's own table), and the split from the same
rules the loader applies (`distributed/layout.py`: an impossible split is the same error
here as at load). Per device it counts

- weights: what parrot's modules hold once loaded (the bytes `LLM.weight_bytes` reports):
  float tensors in the working precision; int8 codes plus one bf16 scale per row; int4
  codes packed two per byte plus a bf16 scale and zero per kernel group; bitsandbytes'
  codes plus its absmax statistics;
- KV cache: keys and values of every layer the device holds, for the context length
  (float32 on CPU, where parrot keeps it so, the working precision elsewhere);
- activations: the transient tensors of a prefill of the prompt (the whole context by
  default, the worst case): the hidden states of one block in flight and the logits of
  every prompt position;
- overhead: the runtime before any model (measured for CPU: Python, torch and the
  tokenizer; for CUDA an allowance for the context and the caching allocator).

Tensor parallelism divides each block's linears and KV heads (replicating kv heads when
there are fewer than devices) and replicates embedding, norms and head; sequential gives
each device its layers (the embedding on the first, the head on the last); FSDP keeps 1/N
of every weight plus what one forward holds gathered (the root's embedding and head and
two blocks: the one running and the one prefetched), and with `--cpu-offload` the shards
live in host memory instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from parrot_cli.config import Config
from parrot_cli.distributed.layout import Layout, layer_split, plan_layout, tensor_split
from parrot_cli.errors import UsageError

# The runtime before any weight: parrot's peak RSS with torch, tokenizers and the CLI
# imported and no model (307 MB measured with SmolLM2's tokenizer: benchmarks/multidevice.md).
CPU_RUNTIME_BYTES = 310_000_000
# CUDA context and the caching allocator's slack: an allowance, not a measurement (the
# context alone is 300-500 MB on recent drivers and does not show in max_memory_allocated).
CUDA_RUNTIME_BYTES = 500_000_000
FLOAT_BYTES = {"bf16-true": 2, "16-true": 2, "32-true": 4}
KERNEL_GROUPS = (256, 128, 64, 32)  # torch's int4 kernel (weight_only.KERNEL_GROUP_SIZES)
# Modes the planner knows beyond the load-time ones: gptq.int4 (a checkpoint mode) stores
# int4 codes with integer zeros in groups of 128 by default.
EXTRA_MODES = {"gptq.int4": 128}
BNB_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights


@dataclass(frozen=True)
class Storage:
    """How one module's weight is held once loaded: float, or a quantization mode."""

    mode: str | None = None  # None: float in the working precision
    group_size: int | None = None  # int4 groups
    act_order: bool = False


FLOAT = Storage()


def linear_bytes(rows: int, cols: int, storage: Storage, float_bytes: int, bias: bool) -> int:
    """Bytes of one Linear [rows, cols] as parrot holds it (plus its bias)."""
    n = rows * cols
    mode = storage.mode
    if mode is None:
        weight = n * float_bytes
    elif mode == "int8":
        weight = n + rows * 2
    elif mode in ("int4", "gptq.int4"):
        group = _kernel_group(storage.group_size or 128, cols)
        weight = n // 2 + rows * (cols // group) * 4 + (cols * 8 if storage.act_order else 0)
    elif mode == "llm.int8":
        weight = n + rows * 4
    elif mode.startswith("bnb."):
        blocks = math.ceil(n / BNB_BLOCK)
        stats = blocks + math.ceil(blocks / 256) * 4 if mode.endswith("-dq") else blocks * 4
        weight = n // 2 + stats
    else:
        raise UsageError(f"parrot estimate does not know the quantization mode {mode!r}.")
    return weight + (rows * float_bytes if bias else 0)


def _kernel_group(group: int, cols: int) -> int:
    for g in KERNEL_GROUPS:
        if g <= group and group % g == 0 and cols % g == 0:
            return g
    return group


def norm_bytes(config: Config, float_bytes: int) -> int:
    return config.n_embd * float_bytes * (1 if config.norm_class == "RMSNorm" else 2)


@dataclass
class Modules:
    """The weight bytes of a model's parts as one device holds them."""

    embedding: int
    head: int  # 0 when tied to a float or int8 embedding
    final_norm: int
    blocks: list[int]

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.final_norm + sum(self.blocks)


def module_bytes(
    config: Config,
    float_bytes: int,
    storage_of: dict[str, Storage],
    block_config: Config | None = None,
    packed_head: bool = False,
) -> Modules:
    """Per part of the model, the bytes its modules hold. `storage_of` maps a module kind
    ("attn.qkv", "mlp.proj", "lm_head", "transformer.wte" ...) to how it is stored;
    `block_config` is the config one tensor-parallel rank builds its blocks from;
    `packed_head`: the CPU's oneDNN-packed head is a copy even of a tied embedding."""
    c = block_config or config
    hs, e = c.head_size, c.n_embd
    q, k, v = c.qkv_sizes
    fc_rows = c.intermediate_size * (2 if c.mlp_class == "GatedMLP" else 1)
    block = (
        linear_bytes(q + k + v, e, storage_of.get("attn.qkv", FLOAT), float_bytes, c.qkv_bias)
        + linear_bytes(e, c.n_head * hs, storage_of.get("attn.proj", FLOAT), float_bytes, c.proj_bias)
        + linear_bytes(fc_rows, e, storage_of.get("mlp.fc", FLOAT), float_bytes, c.mlp_bias)
        + linear_bytes(e, c.intermediate_size, storage_of.get("mlp.proj", FLOAT), float_bytes, c.mlp_bias)
        + norm_bytes(c, float_bytes) * (1 if c.shared_attention_norm else 2)
    )
    vocab = config.vocab_size
    embedding_storage = storage_of.get("transformer.wte", FLOAT)
    if embedding_storage.mode is None:
        embedding = vocab * e * float_bytes
    else:  # the table stays in its stored codes (scales and zeros as stored: bf16)
        groups = e // (embedding_storage.group_size or e)
        bits = 4 if "4" in embedding_storage.mode else 8
        embedding = vocab * e * bits // 8 + vocab * groups * (4 if bits == 4 else 2)
    head_storage = storage_of.get("lm_head")
    if config.tie_embeddings and head_storage is None:
        per_row = not embedding_storage.group_size or embedding_storage.group_size >= e
        tied_int8 = embedding_storage.mode == "int8" and per_row  # the head shares its codes
        shared = (embedding_storage.mode is None and not packed_head) or tied_int8
        head = 0 if shared else linear_bytes(vocab, e, embedding_storage, float_bytes, False)
    else:
        head = linear_bytes(vocab, e, head_storage or FLOAT, float_bytes, False)
    return Modules(embedding, head, norm_bytes(config, float_bytes), [block] * config.n_layer)


@dataclass
class DeviceMemory:
    """What one device (rank) needs, in bytes."""

    rank: int | str  # a rank, or "each" when every rank needs the same
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    host: int = 0  # host memory besides (fsdp --cpu-offload: the shards)
    layers: str = ""
    gathered: int = 0  # fsdp: of `weights`, what a forward holds all-gathered (not the shard)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead


@dataclass
class Estimate:
    model: str
    config: Config
    precision: str
    quantization: str
    device_type: str
    strategy: str
    devices: int
    cpu_offload: bool
    max_seq_length: int
    prompt_tokens: int
    ranks: list[DeviceMemory]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> DeviceMemory:
        return max(self.ranks, key=lambda r: r.total)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        for entry, rank in zip(data["ranks"], self.ranks, strict=True):
            entry["total"] = rank.total
        return data


def storage_table(
    mode: str | None,
    group_size: int | None,
    quantize_head: bool,
    stored: dict[str, dict[str, Any]] | None,
    stored_mode: str | None = None,
) -> dict[str, Storage]:
    """Module kind -> Storage, from a load-time mode or a quantized checkpoint's modules
    (kinds are what the planner distinguishes: every block's qkv, proj, fc, proj; head;
    embedding). A checkpoint that quantizes some blocks' layers differently is planned
    with its first block's (GGUF imports can mix types; the planner says so)."""
    table: dict[str, Storage] = {}
    if stored:
        for name, meta in stored.items():
            kind = name if not name.startswith("transformer.h.") else ".".join(name.split(".")[-2:])
            if kind in table:
                continue
            bits = meta.get("bits")
            label = stored_mode if stored_mode in ("gptq.int4",) and bits == 4 else f"int{bits}"
            group = meta.get("group_size")
            table[kind] = Storage(label, group if bits == 4 or (group and name == "transformer.wte") else None,
                                  bool(meta.get("act_order")))
        if not (mode and quantize_head and "lm_head" not in table):
            return table
    if mode is None:
        return table
    group = group_size or EXTRA_MODES.get(mode)
    linear = Storage(mode, group if mode in ("int4", "gptq.int4") else None)
    for kind in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"):
        table.setdefault(kind, linear)
    if quantize_head:
        table["lm_head"] = linear
    return table


def estimate(
    config: Config,
    *,
    name: str = "",
    precision: str = "bf16-true",
    device_type: str = "cuda",
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_head: bool = False,
    stored: dict[str, dict[str, Any]] | None = None,
    stored_mode: str | None = None,
    strategy: str | None = None,
    devices: int | None = None,
    cpu_offload: bool = False,
    max_seq_length: int | None = None,
    prompt_tokens: int | None = None,
) -> Estimate:
    """Per-device memory for `config` loaded as described (see the module docstring)."""
    if precision not in FLOAT_BYTES:
        raise UsageError(f"Unknown precision {precision!r}; choose one of {', '.join(FLOAT_BYTES)}.")
    fb = FLOAT_BYTES[precision]
    length = max_seq_length or config.block_size
    if not 0 < length <= config.block_size:
        raise UsageError(f"--max-seq-length {length} is outside 1..{config.block_size} (the model's context).")
    prompt = min(prompt_tokens or length, length)
    layout = plan_layout(
        strategy, devices, config=config, device_type=device_type, cpu_offload=cpu_offload,
        quantized=bool(quantize or stored), stored_modules=stored, check_available=False,
        threads=1,
    )
    storage = storage_table(quantize, group_size, quantize_head, stored, stored_mode)
    kv_bytes = 4 if device_type == "cpu" else fb
    overhead = CPU_RUNTIME_BYTES if device_type == "cpu" else CUDA_RUNTIME_BYTES
    notes: list[str] = []
    if stored and len({(m.get("bits"), m.get("group_size")) for m in stored.values()}) > 2:
        notes.append("The checkpoint mixes quantization types; each kind of layer is counted as its first block's.")
    # One CPU device decodes with the fused native step where it runs (its float head read
    # through an int8 mirror); otherwise the CPU's linears are oneDNN-packed (LLM.load).
    fused = device_type == "cpu" and layout is None and _fused_decode(quantize or stored_mode)
    packs = not fused and device_type == "cpu" and layout_strategy(layout) != "fsdp" and (
        precision == "32-true" or (precision == "bf16-true" and _native_bf16())
    )
    ranks = _per_rank(config, layout, storage, fb, kv_bytes, length, prompt, overhead, notes, packs)
    if fused:
        ranks[0].weights += _head_mirror_bytes(config, storage)
    quant = quantize or stored_mode or "float"
    if group_size and quant in ("int4", "gptq.int4"):
        quant += f" g{group_size}"
    return Estimate(
        model=name or config.name,
        config=config,
        precision=precision,
        quantization=quant,
        device_type=device_type,
        strategy=layout.strategy if layout else "none",
        devices=layout.world_size if layout else 1,
        cpu_offload=cpu_offload,
        max_seq_length=length,
        prompt_tokens=prompt,
        ranks=ranks,
        notes=notes + list(layout.notes if layout else ()),
    )


def layout_strategy(layout: Layout | None) -> str:
    return layout.strategy if layout else "none"


def _fused_decode(mode: str | None) -> bool:
    """Whether LLM.load gives one CPU device the fused native decode step: the native
    kernels built, and no bitsandbytes layers (which it does not run)."""
    from parrot_cli.kernels.native import library

    return library() is not None and not (mode or "").startswith(("bnb", "llm.int8"))


def _head_mirror_bytes(config: Config, storage: dict[str, Storage]) -> int:
    """The fused step's int8 copy of a float head (kernels/decode.py mirror_bytes): codes,
    a bf16 scale and an fp32 row error per output."""
    head = storage.get("lm_head")
    if head is not None and head.mode is not None:
        return 0
    if head is None and config.tie_embeddings and storage.get("transformer.wte", FLOAT).mode is not None:
        return 0  # the head runs on the quantized embedding's codes
    return config.vocab_size * config.n_embd + config.vocab_size * (2 + 4)


def _native_bf16() -> bool:
    from parrot_cli.machine import cpu_has_native_bf16

    return cpu_has_native_bf16()


def _activations(config: Config, block: Config, prompt: int, fb: int, with_head: bool) -> int:
    """A prefill of `prompt` tokens: one block's hidden states in flight (its input, the
    norm, the fused qkv and its q/k/v views rotated, the attention output, the MLP's fused
    output and product, and the residual sums) and the logits of every prompt position."""
    q, k, v = block.qkv_sizes
    fc = block.intermediate_size * (2 if block.mlp_class == "GatedMLP" else 1)
    hidden = prompt * (4 * config.n_embd + 2 * (q + k + v) + q + fc + block.intermediate_size) * fb
    logits = prompt * config.vocab_size * fb if with_head else 0
    return hidden + logits


def _kv(block: Config, layers: int, length: int, kv_bytes: int) -> int:
    return 2 * layers * block.n_query_groups * block.head_size * length * kv_bytes


def _per_rank(
    config: Config,
    layout: Layout | None,
    storage: dict[str, Storage],
    fb: int,
    kv_bytes: int,
    length: int,
    prompt: int,
    overhead: int,
    notes: list[str],
    packs: bool = False,
) -> list[DeviceMemory]:
    full = module_bytes(config, fb, storage, packed_head=packs)
    if layout is None:
        return [DeviceMemory(0, full.total, _kv(config, config.n_layer, length, kv_bytes),
                             _activations(config, config, prompt, fb, True), overhead)]
    n = layout.world_size
    if layout.strategy == "tp":
        block = tensor_split(config, n).config(config)
        part = module_bytes(config, fb, storage, block, packed_head=packs)
        return [DeviceMemory("each", part.total, _kv(block, config.n_layer, length, kv_bytes),
                             _activations(config, block, prompt, fb, True), overhead)]
    if layout.strategy == "sequential":
        out = []
        for rank, layers in enumerate(layer_split(config.n_layer, n)):
            first, last = rank == 0, rank == n - 1
            weights = full.final_norm + sum(full.blocks[i] for i in layers)
            if first:
                weights += full.embedding
            if last and config.tie_embeddings:  # the table the head reads, or its packed copy
                weights += full.head or (0 if first else full.embedding)
            elif last:
                weights += full.head
            out.append(DeviceMemory(rank, weights, _kv(config, len(layers), length, kv_bytes),
                                    _activations(config, config, prompt, fb, last), overhead,
                                    layers=f"{layers.start}-{layers.stop - 1}"))
        return out
    # fsdp: a 1/N shard of everything, plus what one forward holds gathered.
    shard = math.ceil(full.total / n)
    gathered = full.embedding + full.head + full.final_norm + 2 * max(full.blocks, default=0)
    kv = _kv(config, config.n_layer, length, kv_bytes)
    act = _activations(config, config, prompt, fb, True)
    if layout.cpu_offload and layout.device_type == "cpu":
        notes.append("On CPU the offloaded shards stay in the same memory: --cpu-offload saves nothing there.")
    elif layout.cpu_offload:
        return [DeviceMemory("each", gathered, kv, act, overhead, host=shard, gathered=gathered)]
    return [DeviceMemory("each", shard + gathered, kv, act, overhead, gathered=gathered)]


@dataclass
class ModelSource:
    """What the planner knows of a model named on the command line."""

    name: str
    config: Config
    stored_modules: dict[str, dict[str, Any]] | None = None  # a quantized checkpoint's table
    stored_mode: str | None = None

    @property
    def cpu_precision(self) -> str:
        """parrot's default precision on this machine's CPU."""
        from parrot_cli.machine import cpu_has_native_bf16

        return "bf16-true" if cpu_has_native_bf16() else "32-true"


def describe_model(model: str | None) -> ModelSource:
    """A local checkpoint (its config and quantization table), else the registry's entry
    (its config.json values): nothing is fetched."""
    from parrot_cli.checkpoint.info import read_info
    from parrot_cli.checkpoint.locate import locate
    from parrot_cli.config import find_known
    from parrot_cli.errors import ModelNotFoundError
    from parrot_cli.quantize.qconfig import read_quantization_config

    try:
        directory = locate(model)
    except ModelNotFoundError:
        known = find_known(model) if model else None
        if known is None:
            raise
        return ModelSource(known.name, known.config)
    info = read_info(directory)
    stored = read_quantization_config(directory)
    return ModelSource(info.config.name or directory.name, info.config,
                       stored.modules if stored else None, stored.mode if stored else None)
