"""Multi-device inference on torch.distributed: one model split over several ranks.

- `layout.py`: which split a request asks for, checked from the config alone (torch-free,
  shared with `parrot estimate`);
- `launch.py`: starting the ranks (parrot starts them itself, or torchrun does) and ending them;
- `runtime.py`: rank 0 leads every model operation, the others follow; the lockstep the
  one sampling core (`generation.generate_tokens`) runs under;
- one module per strategy, each a `checkpoint.load.Shard` (what a rank reads and keeps)
  plus what the rank's model needs around it: `tp.py` (heads and MLP columns split,
  all-reduce after attention and MLP), `sequential.py` (a pipeline of block slices),
  `fsdp.py` (FSDP2 shards, gathered block by block).

The model file knows nothing of any of this.
"""
