"""`--strategy sequential`: each rank holds a contiguous slice of the blocks (a pipeline).

Rank 0 embeds the tokens and runs its blocks, sends the activations [B, T, n_embd] to
rank 1, which runs its blocks and sends on; the last rank applies the final norm and the
head, samples and shares the token. Each rank reads only its blocks' tensors (plus the
embedding on rank 0 and the head on the last rank; with tied embeddings the last rank
reads the table too) and allocates the KV cache of its own layers only.

The pipeline runs through the model's own `forward`: on each rank the parts it does not
hold are replaced by stand-ins on the instance (`Receive` in place of the embedding,
`Send` in place of the final norm, `Drop` in place of the head), and `transformer.h`
keeps only the rank's blocks. Every rank calls forward with the same token ids (the
shared loop in `generation.py` gives them to all), which gives `Receive` the shape of
what arrives. Plain point-to-point send/recv handle any sequence length, so prefill and
decode share one path (`torch.distributed.pipelining` fixes the shape at the first call).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from parrot_cli.checkpoint.load import Shard
from parrot_cli.config import Config
from parrot_cli.distributed.layout import layer_split
from parrot_cli.model import GPT

BLOCK = re.compile(r"transformer\.h\.(\d+)\.")


class LayerShard(Shard):
    """The tensors rank `rank` of `size` reads: its blocks, the embedding (first rank, and
    the last when the head is tied to it), the final norm (every rank: tiny, and the model
    reads the working dtype from it) and the head (last rank)."""

    def __init__(self, config: Config, rank: int, size: int) -> None:
        self.blocks = layer_split(config.n_layer, size)[rank]
        self.first, self.last = rank == 0, rank == size - 1
        self.tied = config.tie_embeddings

    def holds(self, name: str) -> bool:
        match = BLOCK.match(name)
        if match:
            return int(match[1]) in self.blocks
        if name.startswith("transformer.wte."):
            return self.first or (self.last and self.tied)
        if name.startswith("lm_head."):
            return self.last
        return True


class Receive(nn.Module):
    """Stands in for the embedding on ranks after the first: returns the activations the
    previous rank sends, shaped like the token ids plus the embedding width."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, src: int) -> None:
        super().__init__()
        self.width, self.dtype, self.device, self.src = width, dtype, device, src

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = torch.empty(*idx.shape, self.width, dtype=self.dtype, device=self.device)
        dist.recv(x, src=self.src)
        return x


class Send(nn.Module):
    """Stands in for the final norm on ranks before the last: sends the activations on.
    Keeps the norm's weight visible, which is where the model reads its working dtype and
    device."""

    def __init__(self, norm: nn.Module, dst: int) -> None:
        super().__init__()
        self.weight = norm.weight
        self.dst = dst

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist.send(x.contiguous(), dst=self.dst)
        return x


class Drop(nn.Module):
    """Stands in for the head on ranks before the last: they produce no logits."""

    def forward(self, x: torch.Tensor) -> None:
        return None


def prepare(model: GPT, rank: int, size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Keep rank `rank`'s blocks and put the pipeline's stand-ins in place."""
    blocks = layer_split(model.config.n_layer, size)[rank]
    model.transformer.h = nn.ModuleList(model.transformer.h[i] for i in blocks)
    if rank > 0:
        model.transformer.wte = Receive(model.config.n_embd, dtype, device, rank - 1)
    if rank < size - 1:
        model.transformer.ln_f = Send(model.transformer.ln_f, rank + 1)
        model.lm_head = Drop()
