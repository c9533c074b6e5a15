"""`--strategy tp`: tensor parallelism (Megatron style, in plain tensors).

Each rank holds its share of every block: the query heads [r*h, (r+1)*h) with their kv
heads, and the MLP columns [r*m, (r+1)*m). Column-parallel layers (attn.qkv, mlp.fc) keep
their output rows; row-parallel ones (attn.proj, mlp.proj) their matching input columns,
so each rank's attention and MLP output is a partial sum that one all-reduce completes.
Embedding, norms and head are replicated: every rank ends with the same logits.

Two things make or break it (research/multidevice.md):
- the fused weights are cut per part: qkv rows are [q; k; v] and mlp.fc rows [gate; up], so
  a rank takes its heads out of each part (a contiguous cut of the whole fused matrix hands
  rank 0 all of q and rank 1 the k/v rows: wrong numbers, no error);
- a row-parallel bias is added once (rank 0 keeps it, the others hold zeros), not N times.
When there are fewer kv heads than ranks each kv head is repeated on the ranks whose query
heads read it (vLLM's rule). The rank's model is built from a config with its own head
counts, so the model file, its per-module head counts and the KV cache need nothing else.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from parrot_cli.checkpoint.load import Shard
from parrot_cli.config import Config
from parrot_cli.distributed.layout import ROW_PARALLEL, TensorSplit, tensor_split
from parrot_cli.model import GPT
from parrot_cli.quantize.format import QuantizedWeight

COLUMN_PARALLEL = ("attn.qkv", "mlp.fc")


def qkv_rows(config: Config, split: TensorSplit, rank: int) -> torch.Tensor:
    """Row indices of rank `rank`'s [q; k; v] in the fused qkv weight: its query heads out
    of the q part, the kv heads those queries read out of the k and v parts."""
    hs, heads, kv = config.head_size, config.n_head, config.n_query_groups
    q_heads = range(rank * split.n_head, (rank + 1) * split.n_head)
    per_kv = heads // kv
    kv_heads = sorted({h // per_kv for h in q_heads})
    k0, v0 = heads * hs, (heads + kv) * hs

    def rows(offset: int, picked) -> list[int]:
        return [offset + h * hs + i for h in picked for i in range(hs)]

    return torch.tensor(rows(0, q_heads) + rows(k0, kv_heads) + rows(v0, kv_heads))


def fc_rows(config: Config, split: TensorSplit, rank: int) -> torch.Tensor:
    """Row indices of rank `rank`'s part of mlp.fc: [gate_r; up_r] for a gated MLP (each part
    cut alike), a contiguous slice otherwise."""
    width, local = config.intermediate_size, split.intermediate_size
    parts = 2 if config.mlp_class == "GatedMLP" else 1
    return torch.cat([torch.arange(p * width + rank * local, p * width + (rank + 1) * local) for p in range(parts)])


def input_columns(config: Config, split: TensorSplit, kind: str, rank: int) -> tuple[int, int]:
    """[start, end) of the inputs rank `rank` holds of a row-parallel layer."""
    local = split.n_head * config.head_size if kind == "attn.proj" else split.intermediate_size
    return rank * local, (rank + 1) * local


class TensorParallelShard(Shard):
    """What rank `rank` of `size` reads and keeps under tensor parallelism."""

    def __init__(self, config: Config, rank: int, size: int) -> None:
        self.full = config
        self.rank = rank
        self.split = tensor_split(config, size)
        self.rows = {
            "attn.qkv": qkv_rows(config, self.split, rank),
            "mlp.fc": fc_rows(config, self.split, rank),
        }
        self.columns = {kind: input_columns(config, self.split, kind, rank) for kind in ROW_PARALLEL}

    def config(self, config: Config) -> Config:
        return self.split.config(config)

    def take(self, name: str, value):
        owner, _, leaf = name.rpartition(".")
        kind = ".".join(owner.split(".")[-2:])
        if not owner.startswith("transformer.h."):
            return value
        if kind in self.rows:
            rows = self.rows[kind]
            if isinstance(value, QuantizedWeight):
                return value.select_rows(rows)
            return value.index_select(0, rows)
        if kind in self.columns:
            if leaf == "bias":  # added once: by rank 0
                return value if self.rank == 0 else torch.zeros_like(value)
            start, end = self.columns[kind]
            if isinstance(value, QuantizedWeight):
                cut = value.select_columns(start, end)  # views of the codes: the kernels want them dense
                return replace(cut, data=cut.data.contiguous(), scales=cut.scales.contiguous(),
                               zeros=None if cut.zeros is None else cut.zeros.contiguous(),
                               qzeros=None if cut.qzeros is None else cut.qzeros.contiguous())
            return value[:, start:end].contiguous()
        return value


def prepare(model: GPT, group: dist.ProcessGroup | None = None) -> None:
    """Complete each block's partial sums: one in-place all-reduce after attention and one
    after the MLP (hooks on the rank's module instances; the model file is untouched)."""

    def all_reduce(module, inputs, output: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(output, group=group)
        return output

    for block in model.transformer.h:
        block.attn.register_forward_hook(all_reduce)
        block.mlp.register_forward_hook(all_reduce)
