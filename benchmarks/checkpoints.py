"""Quantized checkpoints on disk: what a GGUF import keeps, what it costs, how close it is.

    # the real SmolLM2-135M-Instruct Q4_1 (the default model)
    .venv/bin/python benchmarks/checkpoints.py smollm2
    # a random-weight SmolLM2-1.7B-shaped llama in Q4_0, Q4_1, Q8_0 and Q4_K_M, made by
    # llama.cpp's quantizer (tests/data/make_gguf_fixtures.py; ~10 GB of scratch disk)
    .venv/bin/python benchmarks/checkpoints.py big --work /tmp/bench-gguf

For each file: the import kept quantized (the default) and the float32 import (`--dtype
float32`, the dequantized reference) are written by `parrot convert` in a child process
whose peak RSS (VmHWM) is read at exit; then
- sizes: the checkpoint's weights beside the GGUF;
- logits on a held-out text, three comparisons against the float32 import computing in
  fp32: (a) the quantized import as it runs (int4/int8 kernels, bf16 activations),
  (b) the float import computing in bf16 (what bf16 activations alone cost), and (c) the
  stored weights dequantized and run in fp32 (what the storage alone changes: for the
  exact types, the bf16 rounding of the scales);
- perplexity and greedy continuations (SmolLM2: real weights), with the float model's
  top-2 margin where two greedy paths split;
- `parrot generate` peak RSS and cold start (command to first token on stdout), beside
  llama.cpp (llama-cpp-python, `--llamacpp-python`) on the same file, interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "benchmarks" / "english.txt"
PPL_TEXTS = [ROOT / "tests" / "data" / "perplexity.txt", ROOT / "benchmarks" / "english.txt"]
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The secret to happiness is", "The three most useful things to pack for a hike are"]
LLAMACPP_PYTHON = "/work/llamacpp-venv/bin/python"  # llama-cpp-python and gguf
PEAK = "import atexit, sys\n" \
       "def _peak():\n" \
       "    for line in open('/proc/self/status'):\n" \
       "        if line.startswith('VmHWM'): sys.stderr.write(f'\\nPEAK_KB {line.split()[1]}\\n')\n" \
       "atexit.register(_peak)\n"


# --------------------------------------------------------------------------- child processes


def run_measured(argv: list[str], python: str = sys.executable, code: str | None = None) -> dict:
    """Run `parrot ARGV` (or `code` with ARGV as sys.argv[1:]) in a child; return its wall
    time, the time of its first stdout byte and its peak RSS (VmHWM at exit)."""
    body = PEAK + (code if code is not None else "from parrot_cli.cli import main\nmain(sys.argv[1:])\n")
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-c", body, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    first_at = time.perf_counter() - start if first else None
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    err = err.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}):\n{err[-2000:]}")
    peak = next((int(line.split()[1]) * 1024 for line in err.splitlines() if line.startswith("PEAK_KB")), None)
    return {"wall_s": wall, "first_output_s": first_at, "peak_bytes": peak,
            "stdout": (first + out).decode(errors="replace"), "stderr": err}


LLAMACPP_GENERATE = """
from llama_cpp import Llama
model = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=512, verbose=False)
for chunk in model.create_completion(sys.argv[3], max_tokens=int(sys.argv[4]), temperature=0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"]); sys.stdout.flush()
"""


def convert(source: Path, target: Path, dtype: str | None = None) -> dict:
    argv = ["convert", str(source), "--output", str(target)] + (["--dtype", dtype] if dtype else [])
    result = run_measured(argv)
    result["weights_bytes"] = weights_bytes(target)
    return result


def weights_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))


def cold_starts(gguf: Path, checkpoint: Path, prompt: str, threads: int, llamacpp: str | None, rounds: int) -> dict:
    """Interleaved: parrot generate on the checkpoint, then llama.cpp on the GGUF."""
    out: dict[str, list[dict]] = {"parrot": [], "llama.cpp": []}
    for _ in range(rounds):
        parrot = run_measured(["generate", prompt, "--checkpoint-dir", str(checkpoint), "--max-new-tokens", "8",
                               "--temperature", "0", "--threads", str(threads)])
        out["parrot"].append(parrot)
        if llamacpp:
            out["llama.cpp"].append(run_measured([str(gguf), str(threads), prompt, "8"], python=llamacpp,
                                                 code=LLAMACPP_GENERATE))
    return out


# --------------------------------------------------------------------------- numbers (in-process)


def logits_report(quantized: Path, dequantized: Path, text: str, n_tokens: int) -> dict:
    """The three logit comparisons of the module doc, on the first `n_tokens` of `text`."""
    import torch

    from parrot_cli import LLM
    from parrot_cli.checkpoint.info import read_info
    from parrot_cli.checkpoint.load import build_model
    from parrot_cli.checkpoint.store import load_weights
    from parrot_cli.quantize.format import QuantizedWeight
    from parrot_cli.quantize.qconfig import read_quantization_config

    def stats(got: torch.Tensor, want: torch.Tensor) -> dict:
        diff = (got - want).abs()
        return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                "max_rel_to_logit_range": float(diff.max() / want.abs().max()),
                "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).float().mean())}

    q = LLM.load(quantized, device="cpu", precision="32-true")
    ids = q.tokenizer.encode(text)[:n_tokens]
    got = q.logits(ids)
    del q
    ref_llm = LLM.load(dequantized, device="cpu", precision="32-true")
    want = ref_llm.logits(ids)
    del ref_llm
    bf16 = LLM.load(dequantized, device="cpu", precision="bf16-true").logits(ids)
    # (c): the float model with every stored module replaced by its dequantized weight.
    info = read_info(dequantized)
    model = build_model(info.config, dequantized, torch.device("cpu"), torch.float32)
    stored = read_quantization_config(quantized)
    state = load_weights(quantized)
    weight_err = {}
    with torch.no_grad():
        for module, meta in stored.modules.items():
            qw = QuantizedWeight.from_tensors(module, state, meta)
            deq = qw.dequantize()
            param = model.get_submodule(module).weight
            err = float((deq - param).abs().max() / param.abs().max())
            key = f"{meta.get('from')} -> int{meta['bits']} ({meta.get('how')})"
            weight_err[key] = max(weight_err.get(key, 0.0), err)
            param.copy_(deq)
        storage = model(torch.tensor([ids]))[0].float()
    return {"tokens": len(ids), "quantized_vs_float": stats(got, want), "float_bf16_vs_float": stats(bf16, want),
            "stored_weights_fp32_vs_float": stats(storage, want), "weight_max_rel_error": weight_err,
            "scale_rounding": stored.details.get("scale_rounding")}


def quality_report(quantized: Path, dequantized: Path, max_new: int = 32) -> dict:
    """Perplexity on the held-out texts and greedy continuations of PROMPTS, with the
    float model's top-2 margin (and the bf16 step at that logit) where paths split."""
    from parrot_cli import LLM

    q = LLM.load(quantized, device="cpu", precision="32-true")
    f = LLM.load(dequantized, device="cpu", precision="32-true")
    ppl = {p.name: {"quantized": q.perplexity(p.read_text()), "float": f.perplexity(p.read_text())}
           for p in PPL_TEXTS}
    greedy = []
    for prompt in PROMPTS:
        paths = []
        for llm in (q, f):
            stream = llm.stream(prompt, max_new_tokens=max_new, temperature=0)
            text = "".join(stream)
            paths.append((text, stream.result.token_ids))
        (qt, qi), (ft, fi) = paths
        row = {"prompt": prompt, "same": qi == fi, "quantized": qt, "float": ft}
        if qi != fi:
            split = next(i for i, (a, b) in enumerate(zip(qi, fi, strict=False)) if a != b)
            logits = f.logits(f.tokenizer.encode(prompt) + fi[:split])[-1]
            top = logits.topk(2)
            row |= {"split_at": split, "float_margin": float(top.values[0] - top.values[1]),
                    "bf16_step": 2.0 ** (math.floor(math.log2(abs(float(top.values[0])))) - 7),
                    "tokens": [f.tokenizer.decode([int(top.indices[0])]), f.tokenizer.decode([qi[split]])]}
        greedy.append(row)
    return {"perplexity": ppl, "greedy": greedy}


# --------------------------------------------------------------------------- runs


def machine() -> dict:
    import torch

    from parrot_cli import __version__

    return {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch": torch.__version__,
            "parrot": __version__}


def smollm2(args: argparse.Namespace) -> dict:
    from parrot_cli.checkpoint.sources import fetch
    from parrot_cli.config import KNOWN_MODELS, SMOLLM2_GGUF_NAME

    gguf = fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    q, f = work / "smollm2-q4_1", work / "smollm2-q4_1-f32"
    result = {"machine": machine(), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
              "convert": convert(gguf, q), "convert_float32": convert(gguf, f, "float32")}
    result["logits"] = logits_report(q, f, TEXT.read_text(), 512)
    result["quality"] = quality_report(q, f)
    result["generate"] = cold_starts(gguf, q, PROMPTS[0], args.threads, args.llamacpp_python, args.rounds)
    return result


def big(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    missing = [t for t in types if not (work / f"smollm2-1.7b-random-{t}.gguf").is_file()]
    if missing:
        from parrot_cli.checkpoint.sources import fetch
        from parrot_cli.config import KNOWN_MODELS, SMOLLM2_GGUF_NAME

        tokenizer = fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0])
        subprocess.run([args.llamacpp_python, str(ROOT / "tests" / "data" / "make_gguf_fixtures.py"),
                        "--shape", "smollm2-1.7b", "--tokenizer-from", str(tokenizer), "--out", str(work),
                        "--types", ",".join(missing)], check=True)
    result: dict = {"machine": machine(), "types": {}}
    for t in types:
        gguf = work / f"smollm2-1.7b-random-{t}.gguf"
        q, f = work / f"ckpt-{t}", work / f"ckpt-{t}-f32"
        row: dict = {"gguf_bytes": gguf.stat().st_size, "convert": convert(gguf, q)}
        row["generate"] = cold_starts(gguf, q, PROMPTS[0], args.threads, args.llamacpp_python, args.rounds)
        row["convert_float32"] = convert(gguf, f, "float32")
        out = subprocess.run([sys.executable, __file__, "logits", str(q), str(f), "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        row["logits"] = json.loads(out.stdout)
        for d in (f,):  # 6.8 GB each: keep the disk free for the next type
            subprocess.run(["rm", "-rf", str(d)], check=True)
        row["quantization"] = json.loads((q / "quantization_config.json").read_text())
        row["quantization"].pop("modules")
        result["types"][t] = row
        print(json.dumps({t: summary_row(row)}), flush=True)
    return result


def summary_row(row: dict) -> dict:
    gen = row["generate"]
    return {
        "gguf_GB": row["gguf_bytes"] / 1e9, "checkpoint_GB": row["convert"]["weights_bytes"] / 1e9,
        "ratio": row["convert"]["weights_bytes"] / row["gguf_bytes"],
        "convert_peak_GB": row["convert"]["peak_bytes"] / 1e9, "convert_s": row["convert"]["wall_s"],
        "generate_peak_GB": [g["peak_bytes"] / 1e9 for g in gen["parrot"]],
        "parrot_first_token_s": [g["first_output_s"] for g in gen["parrot"]],
        "llamacpp_first_token_s": [g["first_output_s"] for g in gen["llama.cpp"]],
        "llamacpp_peak_GB": [g["peak_bytes"] / 1e9 for g in gen["llama.cpp"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("smollm2", "big"):
        p = sub.add_parser(name)
        p.add_argument("--work", default=f"/tmp/bench-checkpoints-{name}")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--rounds", type=int, default=2)
        p.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON if Path(LLAMACPP_PYTHON).is_file() else None)
        p.add_argument("--out", type=Path)
        if name == "big":
            p.add_argument("--types", default="Q4_0,Q4_1,Q8_0,Q4_K_M")
            p.add_argument("--tokens", type=int, default=64)
    p = sub.add_parser("logits")
    p.add_argument("quantized", type=Path)
    p.add_argument("dequantized", type=Path)
    p.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if args.what == "logits":
        print(json.dumps(logits_report(args.quantized, args.dequantized, TEXT.read_text(), args.tokens)))
        return
    result = smollm2(args) if args.what == "smollm2" else big(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
