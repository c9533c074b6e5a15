"""Quantization modes on SmolLM2-135M-Instruct, in one interleaved run: weight memory,
perplexity (relative to the fp32 model), decode and prefill tokens/s.

    .venv/bin/python benchmarks/quantize.py [--rounds 5] [--tokens 64] [--threads 1] [--out benchmarks/quantize.md]

Every mode is loaded once, then each round runs every mode in turn (so load on a shared
machine hits them alike); the table shows medians and ranges. Compare ratios to the
unquantized default (bf16-true with oneDNN-prepacked linears on this CPU) within the run.
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
from parrot_cli.quantize.apply import quantized_layers

PROMPT = "Hello, my name is"
TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt"
# (label, quantize, group_size, quantize_head)
RUNNERS = [
    ("default (bf16-true)", None, None, False),
    ("int8", "int8", None, False),
    ("int8 --quantize-head", "int8", None, True),
    ("int4 (default g32 here)", "int4", None, False),
    ("int4 --group-size 64", "int4", 64, False),
    ("int4 --quantize-head", "int4", None, True),
    ("llm.int8", "llm.int8", None, False),
    ("bnb.nf4", "bnb.nf4", None, False),
    ("bnb.nf4-dq", "bnb.nf4-dq", None, False),
    ("bnb.fp4", "bnb.fp4", None, False),
    ("bnb.fp4-dq", "bnb.fp4-dq", None, False),
]


NOTES = """\
Reading the table:
- "weights MiB" is `llm.weight_bytes()`: embedding and norms in bf16, the quantized layers,
  and the head (the default's and int8/int4's include a prepacked bf16 copy of the tied
  head, 54 MiB). The next column compares the quantized layers with their bf16 bytes.
- Decode at batch 1 streams every weight once per token, so fewer bytes should mean more
  tokens/s; what limits each mode here is its kernel. torch's int4 CPU kernel
  (`_weight_int4pack_mm_for_cpu`, outer-product form with a lookup-table dequantization)
  runs ~2x faster per call than its int8 one (`_weight_int8pack_mm`, a dot-product kernel
  that converts and rescales every weight), and the default's oneDNN-prepacked bf16
  linears are nearly as fast as the int8 kernel: so int8 gains ~15%, int4 ~60%.
- int8/int4 compute in bf16 whatever the working precision (fp32 activations would take
  torch's 15-30x slower generic path); the head stays in the working precision (prepacked
  bf16) unless --quantize-head.
- Prefill: the int kernels are batch-1 kernels. int8 dequantizes to one dense bf16 matmul
  above 16 rows; int4 keeps its kernel (~half the default's prefill speed).
- int4's default group size is 32 on this model because its weights come from a Q4_1 GGUF
  (blocks of 32): re-quantizing on the same blocks is nearly lossless. g64 shows what
  4-bit costs on weights that were not already 4-bit.
- llm.int8 quantizes activations too (with fp16 outlier columns) and is the slowest here;
  bitsandbytes' 4-bit CPU path (AVX512-BF16) is faster than the default.
- One thread by default: on this shared 2-core machine two torch threads stall each other
  whenever another process holds a core. Rounds are interleaved, so a busy period hits
  every mode alike; compare the "vs default" column, not absolute tokens/s.
"""


def decode(llm: LLM, tokens: int) -> tuple[float, float]:
    """(decode tok/s after the first token, prefill tok/s of the perplexity text)."""
    stream = llm.stream(PROMPT, max_new_tokens=tokens, temperature=0)
    for _ in stream:
        pass
    prompt = TEXT.read_text()
    pre = llm.stream(prompt, max_new_tokens=1, temperature=0)
    for _ in pre:
        pass
    return stream.result.tokens_per_second, pre.result.prompt_tokens / pre.result.time_to_first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/quantize.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    checkpoint = Path("/tmp/parrot-bench-smollm2")
    if not (checkpoint / "parrot_config.json").is_file():
        convert(fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0], quiet=True), checkpoint)
    text = TEXT.read_text()
    reference = LLM.load(checkpoint, precision="32-true", device="cpu").perplexity(text)
    runners = [r for r in RUNNERS if not args.only or r[0] in args.only.split(",")]
    llms, facts = {}, {}
    for label, mode, group, head in runners:
        start = time.perf_counter()
        llm = LLM.load(checkpoint, device="cpu", quantize=mode, group_size=group, quantize_head=head)
        load = time.perf_counter() - start
        layers = quantized_layers(llm.model)
        layer_bytes = sum(m.nbytes + sum(p.numel() * p.element_size() for p in m.parameters())
                          for m in layers.values())
        bf16_bytes = sum(m.in_features * m.out_features * 2 for m in layers.values())
        facts[label] = {
            "weights": llm.weight_bytes(),
            "of_bf16": layer_bytes / bf16_bytes if layers else 1.0,
            "ppl": llm.perplexity(text) / reference,
            "load": load,
            "mode": llm.quantization.describe() if llm.quantization else llm.precision,
        }
        llms[label] = llm
        decode(llm, 8)  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in llms}
    for _ in range(args.rounds):
        for label, llm in llms.items():
            samples[label].append(decode(llm, args.tokens))
    base = statistics.median(s[0] for s in samples[runners[0][0]])
    rows = []
    for label in llms:
        tg = [s[0] for s in samples[label]]
        pp = [s[1] for s in samples[label]]
        f = facts[label]
        rows.append(
            f"| {label} | {f['mode']} | {f['weights'] / 2**20:.0f} | {f['of_bf16']:.0%} | {f['ppl']:.3f} "
            f"| {statistics.median(tg):.1f} ({min(tg):.1f}-{max(tg):.1f}) | {statistics.median(tg) / base:.2f}x "
            f"| {statistics.median(pp):.0f} | {f['load']:.1f} |"
        )
    command = (f".venv/bin/python benchmarks/quantize.py --rounds {args.rounds} --tokens {args.tokens} "
               f"--threads {args.threads}" + (f" --only '{args.only}'" if args.only else ""))
    out = "\n".join(
        [
            "# Quantization modes: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized), CPU, batch 1",
            "",
            f"`{command}`",
            f"— {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
            f"{args.threads} thread(s), torch {torch.__version__}, parrot {__version__}.",
            f"{args.rounds} interleaved rounds of {args.tokens} greedy decode steps per mode; "
            "median (range). Perplexity on tests/data/perplexity.txt "
            f"({len(llms[runners[0][0]].tokenizer.encode(text))} tokens) over the fp32 model's ({reference:.2f}). "
            "Prefill: the same text as a prompt (time to first token).",
            "",
            "| mode | loaded as | weights MiB | quantized layers / their bf16 bytes | ppl / fp32 "
            "| decode tok/s | vs default | prefill tok/s | load s |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            NOTES,
        ]
    )
    args.out.write_text(out)
    print(out)


if __name__ == "__main__":
    main()
