"""`--strategy fsdp`: FSDP2 (`fully_shard`) over every block and the root, forward only.

Each rank keeps 1/N of every weight (dim 0 shards); before a block runs, its weights are
all-gathered from every rank and freed again after it (`reshard_after_forward=True` on
the blocks and the root: with False or None the gathered weights stay and the memory
saving is gone after the first token). So every token moves the whole model between the
ranks: this strategy trades speed for memory (litgpt dropped it for that reason), and
every rank computes the same full forward, with a full KV cache. `--cpu-offload` keeps
the shards in CPU memory and copies each to the device before its all-gather.

Loading: the model is sharded on the meta device first, then each block's tensors are read
from the memory-mapped checkpoint and each rank copies only its own chunk into its shard
(`distribute_tensor` with the local data, no communication), so no rank ever holds the
whole model (research/multidevice.md 4.5 broadcasts from rank 0 instead; this is the
"each rank its shard" variant).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from parrot_cli.checkpoint.load import Shard
from parrot_cli.model import GPT


class ShardedParameters(Shard):
    """FSDP2 over the model on `mesh`; with `cpu_offload` the shards live in CPU memory."""

    def __init__(self, mesh: DeviceMesh, cpu_offload: bool, dtype: torch.dtype) -> None:
        self.mesh = mesh
        self.dtype = dtype
        # Pinned memory needs an accelerator: a CPU-only torch raises on pin_memory().
        self.policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
        self.cpu_offload = cpu_offload

    def prepare(self, model: GPT, device: torch.device) -> None:
        model.to(self.dtype)  # the shards are allocated in the working dtype, then filled
        for block in model.transformer.h:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=True, offload_policy=self.policy)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=True, offload_policy=self.policy)
        model.to_empty(device="cpu" if self.cpu_offload else device)

    def assign(self, model: GPT, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Copies each rank's chunk into its shard: nothing of `tensors` is held after, so
        the loader hands their mapped pages back (each rank held its shards and the pages
        it read both: 4.9 GB a rank for a 1.1B fp32 model planned at 3.4)."""
        with torch.no_grad():
            for name, full in tensors.items():
                param = model.get_parameter(name) if _is_parameter(model, name) else None
                if isinstance(param, DTensor):
                    local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                    param.to_local().copy_(local.to_local())
                elif param is not None:
                    param.copy_(full)
        return []


def _is_parameter(model: GPT, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in dict(model.get_submodule(owner).named_parameters(recurse=False))
