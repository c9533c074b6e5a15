"""parrot beside llama.cpp on the same weights, interleaved: decode (tg) and prefill (pp)
speed, bytes read per token and their share of the machine's read bandwidth (measured in
the same run), and time from command to first token.

    .venv/bin/python benchmarks/vs_llamacpp.py --llama-python /work/wt/llamacpp-venv/bin/python \\
        --model smollm2 --rounds 3 --out benchmarks/vs-llamacpp-smollm2.md
    .venv/bin/python benchmarks/vs_llamacpp.py --llama-python ... --model random-1.7b \\
        --work /tmp/vs-llamacpp --rounds 2 --out benchmarks/vs-llamacpp-1.7b.md

Models:
- smollm2: SmolLM2-135M-Instruct.Q4_1.gguf (the default model's file). llama.cpp runs the
  file; parrot converts it (dequantized, fp32) and stores int8 and int4 g32 copies of it
  (int4 g32 lands back on the file's Q4_1 grid).
- random-1.7b: a random-weight llama of SmolLM2-1.7B's shape (hidden 2048, 24 layers, 32
  heads, intermediate 8192, vocab 49152, tied), written as an F16 GGUF with the SmolLM2
  tokenizer and quantized by llama.cpp's own quantizer to Q4_0 / Q4_1 / Q8_0; parrot
  converts the F16 file (bf16) and stores int8 and int4 g32 copies of it.
The quantized parrot checkpoints hold the block Linears quantized (the head and embedding
stay float, as load-time `--quantize` leaves them); a float head decodes through its
exactly rescored int8 mirror.

Every measurement is a fresh process (its load included), in rounds: each round measures
the read bandwidth, then every configuration once, parrot and llama.cpp alternating; the
table gives medians over rounds. parrot's rows come from `parrot bench --json` (the prompt
is bench's: uniform random ids, seed 0; llama.cpp gets the same ids), llama.cpp's from a
worker that this script runs under `--llama-python` (llama-cpp-python is never installed
in parrot's environment). tg is measured right after the prompt (depth = prompt length)
for both. "command to first token" times `parrot generate PROMPT -n 1` and the
equivalent llama-cpp-python program from process start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve()
TTFT_PROMPT = "Hello, my name is"
LLAMA_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_M": 15, "F16": 1}  # llama_ftype values


@dataclass
class ParrotMode:
    label: str
    checkpoint: str  # "float", or a stored quantized copy of it: "int8", "int4"
    precision: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelSpec:
    prompt: int
    gen: int
    llama_types: tuple[str, ...]
    parrot_modes: tuple[ParrotMode, ...]


MODES = (
    ParrotMode("fp32", "float", "32-true"),
    ParrotMode("bf16", "float", "bf16-true"),
    ParrotMode("int8", "int8", "32-true"),
    ParrotMode("int4 g32", "int4", "32-true"),
    ParrotMode("int4 g32, torch kernels", "int4", "32-true", {"PARROT_KERNELS": "torch"}),
)
MODELS = {
    "smollm2": ModelSpec(512, 128, ("Q4_1",), MODES),
    "random-1.7b": ModelSpec(128, 64, ("Q4_0", "Q4_1", "Q8_0"), MODES[:4]),
}


# ------------------------------------------------------------------ llama.cpp side
# (these functions run under --llama-python: only the standard library, numpy, gguf and
# llama_cpp there)


def llama_worker(path: str, prompt_file: str, gen: int, reps: int, threads: int) -> None:
    import gguf
    from llama_cpp import Llama

    prompt = json.loads(Path(prompt_file).read_text())
    start = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                n_ctx=len(prompt) + gen + 8, logits_all=False, verbose=False)
    load_s = time.perf_counter() - start
    reader = gguf.GGUFReader(path)
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    per_token = sum(sizes.values()) - (sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    runs = []
    for i in range(reps + 1):  # one warm-up
        llm.reset()  # no reuse of the previous run's prompt
        tokens = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        t0 = time.perf_counter()
        next(tokens)
        t1 = time.perf_counter()
        for _ in range(gen):
            next(tokens)
        t2 = time.perf_counter()
        tokens.close()
        if i:
            runs.append((t1 - t0, t2 - t1))
    print(json.dumps({
        "load_s": load_s, "bytes_per_token": per_token, "weight_bytes": sum(sizes.values()),
        "pp": [len(prompt) / a for a, _ in runs], "tg": [gen / b for _, b in runs],
        "ttft": [a for a, _ in runs], "tensor_types": types,
    }))


def llama_first_token(path: str, threads: int) -> None:
    """The llama-cpp-python program `command to first token` times."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=256, verbose=False)
    tokens = llm.tokenize(TTFT_PROMPT.encode(), add_bos=True)
    token = next(llm.generate(tokens, top_k=1, temp=0.0))
    print(llm.detokenize([token]).decode(errors="replace"), flush=True)


def make_random_gguf(work: str, tokenizer_source: str) -> None:
    """An F16 random-weight llama of SmolLM2-1.7B's shape, then llama.cpp's quantizations."""
    import ctypes

    import gguf
    import llama_cpp
    import numpy as np

    out = Path(work)
    out.mkdir(parents=True, exist_ok=True)
    f16 = out / "random-1.7b-F16.gguf"
    hidden, layers, heads, inter, vocab = 2048, 24, 32, 8192, 49152
    if not f16.exists():
        reader = gguf.GGUFReader(tokenizer_source)
        writer = gguf.GGUFWriter(str(f16) + ".partial", "llama")
        writer.add_string("general.name", "random-1.7b")
        a = "llama"
        for key, value in {"block_count": layers, "context_length": 8192, "embedding_length": hidden,
                           "feed_forward_length": inter, "attention.head_count": heads,
                           "attention.head_count_kv": heads, "rope.dimension_count": hidden // heads,
                           "vocab_size": vocab}.items():
            writer.add_uint32(f"{a}.{key}", value)
        writer.add_float32(f"{a}.rope.freq_base", 130000.0)
        writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        for name, fld in reader.fields.items():
            if name.startswith("tokenizer."):
                vtype = fld.types[0]
                sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(name, fld.contents(), vtype, sub)
        rng = np.random.default_rng(0)

        def weight(rows: int, cols: int) -> np.ndarray:
            return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

        writer.add_tensor("token_embd.weight", weight(vocab, hidden))
        writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
        for i in range(layers):
            for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)),
                                ("attn_v", (hidden, hidden)), ("attn_output", (hidden, hidden)),
                                ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                                ("ffn_down", (hidden, inter))):
                writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(str(f16) + ".partial", f16)
    for name in MODELS["random-1.7b"].llama_types:
        dst = out / f"random-1.7b-{name}.gguf"
        if dst.exists():
            continue
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_TYPES[name]
        params.nthread = os.cpu_count() or 1
        tmp = str(dst) + ".partial"
        if llama_cpp.llama_model_quantize(str(f16).encode(), tmp.encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize to {name}")
        os.replace(tmp, dst)


# ------------------------------------------------------------------ the run (parrot's venv)


def machine() -> dict:
    import torch

    from parrot_cli.machine import cpu_name, git_revision

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16")
           if f in flags]
    from parrot_cli.kernels import native

    lib = native.library()
    return {
        "cpu": cpu_name(), "cores": os.cpu_count(), "flags": isa,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "torch": torch.__version__, "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "parrot_kernels": lib.isa if lib else f"none ({native.unavailable_reason()})",
        "git": git_revision(), "python": platform.python_version(), "platform": platform.platform(),
    }


def load_average() -> float:
    return os.getloadavg()[0]


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def wall(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def parrot_bin() -> str:
    return str(Path(sys.executable).with_name("parrot"))


def quantized_copy(float_dir: Path, target: Path, mode: str) -> Path:
    """`float_dir` with every block Linear stored quantized in the portable layout (int4
    g32 or int8 per channel, the same quantizers as load-time `--quantize`): loading it maps
    the codes instead of quantizing at every start, as a quantized checkpoint does."""
    import shutil

    from parrot_cli.checkpoint.store import CheckpointWriter, load_weights, read_info
    from parrot_cli.quantize.qconfig import QuantizationConfig
    from parrot_cli.quantize.weight_only import quantize_int4, quantize_int8

    if target.exists():
        return target
    info = read_info(float_dir)
    modules = {}
    with CheckpointWriter(target) as writer:
        for name, tensor in load_weights(float_dir).items():
            owner, _, kind = name.rpartition(".")
            if owner.startswith("transformer.h.") and kind == "weight" and tensor.dim() == 2:
                qw = quantize_int4(tensor.float(), 32) if mode == "int4" else quantize_int8(tensor)
                for key, t in qw.tensors(owner + ".").items():
                    writer.add_tensor(key, t)
                modules[owner] = qw.meta()
            else:
                writer.add_tensor(name, tensor)
        for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (float_dir / extra).exists():
                shutil.copy(float_dir / extra, writer.partial / extra)
        provenance = {k: v for k, v in info.provenance.items() if k != "files"}
        return writer.commit(info.config, provenance, QuantizationConfig(mode, "rtn", modules))


def prepare(args, spec: ModelSpec) -> tuple[dict[str, Path], dict[str, Path]]:
    """(parrot checkpoint kind -> directory, llama.cpp type -> GGUF file)."""
    from parrot_cli.checkpoint.convert import convert
    from parrot_cli.checkpoint.sources import fetch
    from parrot_cli.config import KNOWN_MODELS, SMOLLM2_GGUF_NAME

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    smollm2 = fetch(KNOWN_MODELS[SMOLLM2_GGUF_NAME].sources[0], quiet=True)
    if args.model == "smollm2":
        files, source, dtype = {"Q4_1": smollm2}, smollm2, "float32"
    else:
        subprocess.run([args.llama_python, str(HERE), "--make-gguf", str(work), str(smollm2)], check=True)
        files = {t: work / f"random-1.7b-{t}.gguf" for t in spec.llama_types}
        source, dtype = work / "random-1.7b-F16.gguf", "bfloat16"
    checkpoint = work / f"parrot-{args.model}"
    if not checkpoint.exists():
        convert(source, checkpoint, dtype=dtype)
    checkpoints = {"float": checkpoint}
    for mode in sorted({m.checkpoint for m in spec.parrot_modes} - {"float"}):
        checkpoints[mode] = quantized_copy(checkpoint, work / f"parrot-{args.model}-{mode}", mode)
    return checkpoints, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--llama-python", help="a python with llama-cpp-python (and gguf, numpy)")
    parser.add_argument("--work", default="/tmp/vs-llamacpp", help="where the files are built")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2, help="timed runs per process, after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--only", default="", help="comma-separated row labels to run (default: all)")
    parser.add_argument("--out", type=Path, help="write the markdown report here (and .json beside it)")
    parser.add_argument("--worker-llama", nargs=4, metavar=("GGUF", "PROMPT_FILE", "GEN", "REPS"))
    parser.add_argument("--first-token-llama", metavar="GGUF")
    parser.add_argument("--make-gguf", nargs=2, metavar=("WORK", "TOKENIZER_GGUF"))
    args = parser.parse_args()
    if args.worker_llama:
        path, prompt_file, gen, reps = args.worker_llama
        return llama_worker(path, prompt_file, int(gen), int(reps), args.threads)
    if args.first_token_llama:
        return llama_first_token(args.first_token_llama, args.threads)
    if args.make_gguf:
        return make_random_gguf(*args.make_gguf)
    if not args.llama_python:
        parser.error("--llama-python is required")
    run(args)


def run(args) -> None:
    import torch

    from parrot_cli.machine import measure_read_bandwidth

    spec = MODELS[args.model]
    checkpoints, files = prepare(args, spec)
    from parrot_cli.checkpoint.store import read_info

    vocab = read_info(checkpoints["float"]).config.vocab_size
    generator = torch.Generator().manual_seed(0)  # parrot bench's prompt: the same ids
    prompt = torch.randint(0, vocab, (spec.prompt,), generator=generator).tolist()
    prompt_file = Path(args.work) / f"prompt-{args.model}.json"
    prompt_file.write_text(json.dumps(prompt))
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = [("llama.cpp", t) for t in spec.llama_types] + [("parrot", m) for m in spec.parrot_modes]
    rows = [r for r in rows if not only or label(r) in only]
    # alternate engines within a round: llama, parrot, llama, parrot, ...
    llama_rows, parrot_rows = [r for r in rows if r[0] == "llama.cpp"], [r for r in rows if r[0] == "parrot"]
    order = []
    for i in range(max(len(llama_rows), len(parrot_rows))):
        order += llama_rows[i:i + 1] + parrot_rows[i:i + 1]
    results: dict[str, list[dict]] = {label(r): [] for r in order}
    bandwidths, loads = [], [load_average()]
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    about = machine()
    for r in range(args.rounds):
        bandwidths.append(measure_read_bandwidth("cpu"))
        for row in order:
            print(f"round {r + 1}/{args.rounds}: {label(row)} (load {load_average():.2f})", file=sys.stderr)
            results[label(row)].append(measure(args, row, checkpoints, files, spec, prompt_file, bandwidths[-1]))
        loads.append(load_average())
        # the report so far after every round: a run cut short still leaves its rounds
        report = {"model": args.model, "spec": {"prompt": spec.prompt, "gen": spec.gen}, "machine": about,
                  "started": started, "load_average": loads, "bandwidth_gbs": bandwidths,
                  "command": " ".join([Path(sys.executable).name, "benchmarks/vs_llamacpp.py", *sys.argv[1:]]),
                  "results": results}
        text = markdown(report)
        if args.out:
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(text)


def label(row) -> str:
    engine, what = row
    return f"llama.cpp {what}" if engine == "llama.cpp" else f"parrot {what.label}"


def measure(args, row, checkpoints: dict[str, Path], files: dict[str, Path], spec: ModelSpec,
            prompt_file: Path, bandwidth: float) -> dict:
    engine, what = row
    if engine == "llama.cpp":
        path = str(files[what])
        got = run_json([args.llama_python, str(HERE), "--threads", str(args.threads),
                        "--worker-llama", path, str(prompt_file), str(spec.gen), str(args.reps)])
        got["first_token_s"] = wall([args.llama_python, str(HERE), "--threads", str(args.threads),
                                     "--first-token-llama", path])
        return got
    env = dict(what.env)
    checkpoint = checkpoints[what.checkpoint]
    bench = run_json([parrot_bin(), "bench", "--checkpoint-dir", str(checkpoint), "--precision", what.precision,
                      "-p", str(spec.prompt), "-n", str(spec.gen), "-r", str(args.reps),
                      "--threads", str(args.threads), "--bandwidth", f"{bandwidth:.3f}", "--json"], env)
    row_ = bench["results"][0]
    if row_["error"]:
        raise SystemExit(f"parrot {what.label}: {row_['error']}")
    got = {
        "load_s": row_["load_s"], "bytes_per_token": row_["bytes_per_token"], "weight_bytes": row_["weight_bytes"],
        "pp": row_["pp_tokens_per_s"]["samples"], "tg": row_["tg_tokens_per_s"]["samples"],
        "ttft": row_["time_to_first_token_s"]["samples"], "peak_memory_bytes": row_["peak_memory_bytes"],
    }
    cmd = [parrot_bin(), "generate", TTFT_PROMPT, "--checkpoint-dir", str(checkpoint), "--max-new-tokens", "1",
           "--temperature", "0", "--precision", what.precision, "--threads", str(args.threads)]
    got["first_token_s"] = wall(cmd, env)
    return got


def markdown(report: dict) -> str:
    spec, m = report["spec"], report["machine"]
    med = statistics.median
    rows = report["results"]
    bw = med(report["bandwidth_gbs"])

    def tg(r):
        return med(x for run in r for x in run["tg"])

    def pp(r):
        return med(x for run in r for x in run["pp"])

    llama = {k: v for k, v in rows.items() if k.startswith("llama.cpp")}
    best = max(llama, key=lambda k: tg(llama[k])) if llama else None
    best_pp = max(llama, key=lambda k: pp(llama[k])) if llama else None
    lines = [
        f"# parrot vs llama.cpp: {report['model']} (pp{spec['prompt']} + tg{spec['gen']})", "",
        f"{report['started']}; {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB), flags: "
        f"{', '.join(m['flags']) or 'none of avx2/avx512'}; torch {m['torch']} (CPU capability "
        f"{m['torch_capability']}), parrot kernels: {m['parrot_kernels']}, parrot {m['git']}.",
        f"Load average (1 min) before, and after each round: {', '.join(f'{x:.2f}' for x in report['load_average'])}. "
        f"Read bandwidth (torch .sum() over 512 MB, best of 5, each round): "
        f"{', '.join(f'{x:.1f}' for x in report['bandwidth_gbs'])} GB/s; the shares use the median, {bw:.1f} GB/s.",
        "", "```", report["command"], "```", "",
        "| engine | bytes/token | tg t/s | vs llama.cpp best | share of bandwidth | pp t/s | vs llama.cpp best pp "
        "| TTFT (pp) ms | command to first token s | load s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        b = runs[0]["bytes_per_token"]
        t, p = tg(runs), pp(runs)
        lines.append(
            f"| {name} | {b / 1e6:.0f} MB | {t:.1f} | "
            f"{t / tg(llama[best]):.2f}x | {b * t / 1e9 / bw:.0%} | {p:.0f} | {p / pp(llama[best_pp]):.2f}x | "
            f"{med(x for r in runs for x in r['ttft']) * 1000:.0f} | {med(r['first_token_s'] for r in runs):.2f} | "
            f"{med(r['load_s'] for r in runs):.2f} |"
        )
    lines += ["", f"Medians over {len(next(iter(rows.values())))} rounds x the runs of each process. "
              f"tg: {spec['gen']} greedy decode steps right after the {spec['prompt']}-token prompt; pp: prompt "
              "tokens / time to first token (prefill + first sample). bytes/token: weights a token reads "
              "(the KV cache, ~2 x layers x kv width x depth x 4 bytes, is not counted). share of bandwidth: "
              "bytes/token x tg / read bandwidth. command to first token: wall time of `parrot generate "
              f"\"{TTFT_PROMPT}\" -n 1` / the same with llama-cpp-python, process start to exit."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
