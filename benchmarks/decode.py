"""Decode speed of SmolLM2-135M-Instruct on this machine: parrot fp32 / bf16 beside
transformers on the same weights, in one interleaved run, beside the memory-bandwidth bound.

    .venv/bin/python benchmarks/decode.py [--rounds 5] [--tokens 128] [--out benchmarks/decode-smollm2-cpu.md]

Decode is bandwidth-bound at batch 1: tokens/s <= read bandwidth / bytes of weights read
per token. The bandwidth is measured here (torch .sum() over 1 GiB). Timings on a shared
machine are noisy: compare the ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from parrot_cli import LLM, __version__
from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.sources import fetch
from parrot_cli.config import KNOWN_MODELS, SMOLLM2_GGUF_NAME

PROMPT = "Hello, my name is"


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """GB/s of a streaming read (sum over a tensor much larger than the caches)."""
    x = torch.ones(int(gib * 1024**3 / 4), dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parrot_decode(llm: LLM, tokens: int) -> float:
    stream = llm.stream(PROMPT, max_new_tokens=tokens, temperature=0)
    for _ in stream:
        pass
    return stream.result.tokens_per_second


def hf_decode(model, ids: torch.Tensor, tokens: int) -> float:
    """Tokens/s after the first: time(n tokens) - time(1 token) covers n-1 decode steps."""
    kwargs = {"do_sample": False, "min_new_tokens": tokens, "max_new_tokens": tokens}
    with torch.inference_mode():
        one = _timed(lambda: model.generate(ids, do_sample=False, max_new_tokens=1))
        full = _timed(lambda: model.generate(ids, **kwargs))
    return (tokens - 1) / (full - one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/decode-smollm2-cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gguf = fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0], quiet=True)
    checkpoint = Path("/tmp/parrot-bench-smollm2")
    if not (checkpoint / "parrot_config.json").is_file():
        convert(gguf, checkpoint)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    runners = {}
    weight_bytes = {}
    for precision, dtype in (("32-true", torch.float32), ("bf16-true", torch.bfloat16)):
        llm = LLM.load(checkpoint, precision=precision, device="cpu")
        weight_bytes[precision] = llm.weight_bytes()
        runners[f"parrot {precision}"] = (precision, lambda llm=llm: parrot_decode(llm, args.tokens))
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()
        runners[f"transformers {dtype}".replace("torch.", "")] = (
            precision,
            lambda hf=hf: hf_decode(hf, ids, args.tokens),
        )
    for _, run in runners.values():  # warm-up
        run()
    bandwidth = read_bandwidth()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, (_, run) in runners.items():
            samples[name].append(run())
    # Bytes read per token: every weight once (the tied head reads the embedding matrix).
    params = 134_515_008
    rows = []
    for name, (precision, _) in runners.items():
        per_token = params * (4 if precision == "32-true" else 2)
        median = statistics.median(samples[name])
        bound = bandwidth * 1e9 / per_token
        rows.append(
            f"| {name} | {median:.1f} | {min(samples[name]):.1f}-{max(samples[name]):.1f} "
            f"| {per_token / 1e6:.0f} | {bound:.0f} | {median / bound:.0%} |"
        )
    base = statistics.median(samples["parrot bf16-true"])
    ratio = base / statistics.median(samples["transformers bfloat16"])
    text = "\n".join(
        [
            "# Decode speed: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), batch 1, greedy",
            "",
            f"`.venv/bin/python benchmarks/decode.py --rounds {args.rounds} --tokens {args.tokens}`",
            f"— {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
            f"{args.threads} threads, torch {torch.__version__}, parrot {__version__}.",
            f"Measured read bandwidth: {bandwidth:.1f} GB/s. {args.rounds} interleaved rounds of "
            f"{args.tokens} decode steps; median and range.",
            "",
            "| runner | tok/s (median) | range | MB read/token | bound tok/s | of bound |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"parrot bf16 / transformers bf16: {ratio:.2f}x",
            "",
        ]
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
