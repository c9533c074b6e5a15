"""One world of ranks for many distributed checks (run by tests/test_distributed.py).

`torchrun --standalone --nproc-per-node 2 -m tests.dist_harness JOBS OUT`: every rank runs
this; for each job every rank calls the real `LLM.load(..., strategy=...)` (the torchrun
path: rank 0 gets the LLM, the others serve it until it is closed and then leave `load`
with SystemExit), so one pair of processes (one torch import each) serves every family and
strategy. Rank 0 writes what each job produced to OUT (JSON); the test compares it with the
one-device references it computed itself.

A job may ask for `"naive_qkv": true`: both ranks then cut the fused qkv weight into
contiguous row blocks, the mistake the tests must catch.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from parrot_cli import LLM
from parrot_cli.distributed import tp
from parrot_cli.generation import SamplingParams


def naive_qkv_rows(config, split, rank: int) -> torch.Tensor:
    """Rank r's contiguous block of the fused [q; k; v] rows: wrong (it hands rank 0 most of
    q and rank 1 the rest of q with all of k and v), yet every shape fits."""
    rows = (split.n_head + 2 * split.n_kv) * config.head_size
    return torch.arange(rank * rows, (rank + 1) * rows)


def run(job: dict, rank: int) -> dict | None:
    real = tp.qkv_rows
    if job.get("naive_qkv"):
        tp.qkv_rows = naive_qkv_rows
    try:
        kwargs = {"precision": "32-true", "device": "cpu", "strategy": job["strategy"],
                  "cpu_offload": job.get("cpu_offload"), "quantize": job.get("quantize")}
        if rank != 0:
            try:
                LLM.load(job["checkpoint"], **kwargs)
            except SystemExit as done:
                assert done.code == 0, f"rank {rank} left {job['name']} with {done.code}"
            return None
        began = time.perf_counter()
        llm = LLM.load(job["checkpoint"], **kwargs)
        try:
            out: dict = {"name": job["name"], "notes": llm.notes}
            ids = job["ids"]
            if ids:
                llm.ensure_cache(len(ids) + job["max_new"])
                with torch.inference_mode():
                    tokens = list(llm.tokens(ids, max_new_tokens=job["max_new"],
                                             params=SamplingParams(temperature=0.0)))
                out["tokens"] = tokens
                out["logits"] = llm.logits(ids + tokens[:-1]).tolist()
            if job.get("text"):
                out["text"] = llm.generate(job["text"], temperature=0, max_new_tokens=job["max_new"])
            out["memory"] = llm.memory_by_rank()
            out["seconds"] = time.perf_counter() - began  # what each job costs the suite
            return out
        finally:
            llm.close()
    finally:
        tp.qkv_rows = real


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    rank = int(os.environ["RANK"])
    results = []
    for job in jobs:
        result = run(job, rank)
        if result is not None:
            results.append(result)
    if rank == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
