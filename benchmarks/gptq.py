"""GPTQ on SmolLM2-135M-Instruct, CPU: quantization time and peak memory, checkpoint size,
perplexity, and decode/prefill speed beside load-time RTN int4 at the same group sizes.

    .venv/bin/python benchmarks/gptq.py [--samples 32] [--seq-len 512] [--rounds 5] [--tokens 64]
                                        [--threads 1] [--out benchmarks/gptq.md]

Each GPTQ checkpoint is made by `parrot quantize gptq` in a child process (so its time and
peak RSS, VmHWM, are its own); then every model is loaded once and each round decodes with
every one in turn (a busy period hits them alike). Perplexity on tests/data/perplexity.txt,
which is not calibration text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from parrot_cli import LLM, __version__
from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.sources import fetch
from parrot_cli.config import KNOWN_MODELS, SMOLLM2_GGUF_NAME

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "perplexity.txt"
PROMPT = "Hello, my name is"
# (label, group size, act-order)
GPTQ = [("gptq g64", 64, False), ("gptq g64 --act-order", 64, True),
        ("gptq g32", 32, False), ("gptq g32 --act-order", 32, True)]
RTN = [("int4 g64 (RTN at load)", 64), ("int4 g32 (RTN at load)", 32)]


def make(source: Path, target: Path, group: int, act_order: bool, samples: int, seq_len: int,
         threads: int) -> dict:
    """Run `parrot quantize gptq` in a child; its wall time, peak RSS and summary."""
    args = [sys.executable, "-m", "parrot_cli", "quantize", "gptq", "--checkpoint-dir", str(source),
            "-o", str(target), "--group-size", str(group), "--samples", str(samples), "--seq-len", str(seq_len),
            "--device", "cpu", "--threads", str(threads)] + (["--act-order"] if act_order else [])
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=os.environ)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(done.stderr)
    peak = re.search(r"Peak memory ([0-9.]+) GB RSS", done.stderr)
    error = re.search(r"Mean relative output error ([0-9.]+), against ([0-9.]+)", done.stderr)
    size = sum(p.stat().st_size for p in target.iterdir())
    return {"seconds": seconds, "peak_gb": float(peak[1]), "size": size,
            "error": float(error[1]), "rtn_error": float(error[2])}


def decode(llm: LLM, tokens: int) -> tuple[float, float]:
    stream = llm.stream(PROMPT, max_new_tokens=tokens, temperature=0)
    for _ in stream:
        pass
    pre = llm.stream(TEXT.read_text(), max_new_tokens=1, temperature=0)
    for _ in pre:
        pass
    return stream.result.tokens_per_second, pre.result.prompt_tokens / pre.result.time_to_first_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/parrot-bench-gptq"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gptq.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = args.work / "SmolLM2-135M-Instruct"
    if not (source / "parrot_config.json").is_file():
        convert(fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0], quiet=True), source, dtype="float32")
    load_before = os.getloadavg()
    made = {}
    for label, group, act in GPTQ:
        target = args.work / label.replace(" ", "").replace("--", "-")
        made[label] = make(source, target, group, act, args.samples, args.seq_len, args.threads)
        made[label]["dir"] = target
        print(label, json.dumps({k: v for k, v in made[label].items() if k != "dir"}), file=sys.stderr)
    text = TEXT.read_text()
    reference = LLM.load(source, precision="32-true", device="cpu").perplexity(text)
    llms, ppl = {}, {}
    for label, group in RTN:
        llms[label] = LLM.load(source, device="cpu", quantize="int4", group_size=group)
    for label in made:
        llms[label] = LLM.load(made[label]["dir"], device="cpu")
    for label, llm in llms.items():
        ppl[label] = llm.perplexity(text) / reference
        decode(llm, 8)  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {label: [] for label in llms}
    for _ in range(args.rounds):
        for label, llm in llms.items():
            samples[label].append(decode(llm, args.tokens))
    base = statistics.median(s[0] for s in samples[RTN[0][0]])
    rows = []
    for label in llms:
        tg = [s[0] for s in samples[label]]
        pp = statistics.median(s[1] for s in samples[label])
        m = made.get(label)
        quant = (f"{m['seconds']:.0f} | {m['peak_gb']:.2f} | {m['size'] / 2**20:.0f} | "
                 f"{m['error'] / m['rtn_error']:.2f}x" if m else "- | - | - | -")
        rows.append(f"| {label} | {ppl[label]:.3f} | {quant} | {statistics.median(tg):.1f} "
                    f"({min(tg):.1f}-{max(tg):.1f}) | {statistics.median(tg) / base:.2f}x | {pp:.0f} |")
    load_after = os.getloadavg()
    command = (f".venv/bin/python benchmarks/gptq.py --samples {args.samples} --seq-len {args.seq_len} "
               f"--rounds {args.rounds} --tokens {args.tokens} --threads {args.threads}")
    out = "\n".join([
        "# GPTQ: SmolLM2-135M-Instruct (float32 from the Q4_1 GGUF), CPU, batch 1",
        "",
        f"`{command}`",
        f"— {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__}, parrot {__version__}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other jobs shared the cores).",
        f"Calibration: the default text (Python documentation), {args.samples} x {args.seq_len} tokens. "
        f"Perplexity on tests/data/perplexity.txt over the fp32 model's ({reference:.2f}). Decode: "
        f"{args.rounds} interleaved rounds of {args.tokens} greedy steps, median (range); prefill: that "
        "text as a prompt.",
        "",
        "| model | ppl / fp32 | quantize s | peak RSS GB | checkpoint MiB | layer error vs RTN "
        "| decode tok/s | vs int4 g64 | prefill tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    args.out.write_text(out)
    print(out)


if __name__ == "__main__":
    main()
