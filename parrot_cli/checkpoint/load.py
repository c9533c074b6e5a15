"""From a checkpoint directory to a ready `GPT` module on its device.

The model is built on the meta device (no random initialisation, no memory), then the
memory-mapped weights are cast, moved and assigned tensor by tensor, so no second full
copy exists in RAM when dtype and device already match.
"""

from __future__ import annotations

from pathlib import Path

import torch

from parrot_cli.checkpoint.store import load_weights
from parrot_cli.config import Config
from parrot_cli.errors import CheckpointError, OutOfMemoryError
from parrot_cli.model import GPT


def build_model(config: Config, checkpoint_dir: Path, device: torch.device, dtype: torch.dtype) -> GPT:
    """Build on the meta device, then assign the memory-mapped weights (cast and moved):
    no random initialisation, no second copy when dtype and device already match."""
    with torch.device("meta"):
        model = GPT(config)
    state = load_weights(checkpoint_dir)
    if config.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        what = f"missing {sorted(missing)[0]!r}" if missing else f"unexpected {sorted(unexpected)[0]!r}"
        raise CheckpointError(f"{checkpoint_dir} does not match its config ({what}).")
    try:
        for name, tensor in state.items():
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        model.load_state_dict(state, strict=False, assign=True)
    except torch.OutOfMemoryError as err:
        raise OutOfMemoryError(f"Out of memory loading {checkpoint_dir} onto {device}.") from err
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint_dir} has weights of the wrong shape ({err}).") from err
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.rope.build(1, device)
    return model.eval().requires_grad_(False)
