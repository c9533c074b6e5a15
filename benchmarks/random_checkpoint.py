"""Write a random-weight parrot checkpoint of a real model's shape (for speed and memory
benchmarks of models larger than the ones on this machine; nothing is downloaded).

    python benchmarks/random_checkpoint.py OUT [--shape tinyllama-1.1b] [--dtype float32]

Weights are N(0, 0.02) (norms 1), so the text is noise, but every byte a real model of this
shape moves is moved. `parrot bench` needs no tokenizer (it feeds random token ids).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from parrot_cli.checkpoint.store import CheckpointWriter
from parrot_cli.config import Config
from parrot_cli.model import GPT

SHAPES = {
    # TinyLlama-1.1B's config.json: 22 layers, hidden 2048, 32 heads / 4 kv heads, MLP 5632.
    "tinyllama-1.1b": {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
                       "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
                       "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                       "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    config = Config.from_hf(SHAPES[args.shape], name=f"random-{args.shape}")
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        names = {k: (v.shape, "norm" in k or k.endswith("ln_f.weight")) for k, v in GPT(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    with CheckpointWriter(args.out) as writer:
        for name, (shape, is_norm) in names.items():
            if is_norm:
                tensor = torch.ones(shape, dtype=dtype)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
            writer.add_tensor(name, tensor)
        writer.write_json("generation_config.json", {"eos_token_id": config.eos_token_id})
        writer.commit(config, {"source": f"random weights, {args.shape} shape", "format": "random"})
    print(args.out)


if __name__ == "__main__":
    main()
