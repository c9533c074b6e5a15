"""`parrot bench` on a tiny random Llama (tests/hf_factory.py) converted by parrot.

The tiny model gets a real word-level tokenizer (tokenizers' WordLevel, 100 words) so that
`--ppl` can run, and transformers runs the very same HF directory as the `--vs` peer.
Most tests call the CLI in-process (`main([...])`), one runs the real command; every
figure comes from real runs, and forward calls are counted with a module hook."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import itertools
import json
import signal
from pathlib import Path

import pytest
import torch

from parrot_cli.cli import main
from parrot_cli.model import GPT
from tests.conftest import run_parrot
from tests.hf_factory import CASES_BY_ID, build

WORDS = [f"w{i}" for i in range(100)]
TEXT = " ".join(WORDS[(7 * i) % 100] for i in range(40))  # 40 tokens: two windows of context
FIELDS = {
    "engine", "strategy", "quantize", "quantize_requested", "precision", "threads", "compile",
    "prompt_tokens", "gen_tokens", "test", "error", "interrupted", "load_s",
    "pp_tokens_per_s", "tg_tokens_per_s", "time_to_first_token_s", "decode_steps",
    "peak_memory_bytes", "baseline_memory_bytes", "rank_memory", "weight_bytes", "bytes_per_token",
    "bandwidth_gbs", "bandwidth_share", "perplexity", "vs",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama (GQA, tied head; context 32) with a tokenizer, converted by parrot."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from parrot_cli.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("bench")
    build(CASES_BY_ID["llama-gqa-tied"], root / "hf")
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    return convert(root / "hf", root / "tiny")


@pytest.fixture()
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def bench(capsys, *args: str) -> tuple[int, str, str]:
    """Run `parrot bench ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["bench", *args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@contextlib.contextmanager
def forward_lengths(on_call=None):
    """Record the input length of every forward call of every parrot GPT, and 1 for each
    fused decode step (kernels/decode.py: a step that runs no forward), in order."""
    from parrot_cli.kernels.decode import NativeDecoder

    calls: list[int] = []

    def record(length: int) -> None:
        calls.append(length)
        if on_call is not None:
            on_call(len(calls))

    def hook(module, args, output):
        if isinstance(module, GPT):
            record(args[0].shape[1])

    fused_step = NativeDecoder.step

    def step(self, *args):
        record(1)
        return fused_step(self, *args)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    NativeDecoder.step = step
    try:
        yield calls
    finally:
        handle.remove()
        NativeDecoder.step = fused_step


def test_json_has_every_field_samples_and_exact_decode_steps(tiny, text_file, capsys):
    from parrot_cli import LLM

    with forward_lengths() as calls:
        code, out, err = bench(
            capsys, "--checkpoint-dir", str(tiny), "-p", "5", "-n", "3", "-r", "2",
            "--precision", "32-true", "--ppl", str(text_file), "--vs", "transformers", "--json",
        )
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == "parrot-bench/1" and report["interrupted"] is False
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["parrot"] and env["cpu"] and env["cpu_count"]
    assert "git_revision" in env
    assert report["model"]["name"] == "tiny" and report["model"]["format"] == "huggingface"
    assert report["machine_bandwidth"]["source"] == "measured" and report["machine_bandwidth"]["gbs"] > 0
    assert report["memory_method"] == "rss-peak"
    parrot, peer = report["results"]
    assert set(parrot) == FIELDS and set(peer) == FIELDS
    assert (parrot["engine"], peer["engine"]) == ("parrot", "transformers")
    for row in (parrot, peer):
        assert row["error"] is None and row["precision"] == "32-true"
        assert row["decode_steps"] == [3, 3]  # EOS never stops a run early
        for name in ("pp_tokens_per_s", "tg_tokens_per_s", "time_to_first_token_s", "bandwidth_gbs"):
            fig = row[name]
            assert len(fig["samples"]) == 2 and fig["mean"] == pytest.approx(sum(fig["samples"]) / 2)
            assert fig["std"] >= 0
        assert row["load_s"] > 0 and row["peak_memory_bytes"] >= row["weight_bytes"] > 0
        assert 0 < row["bandwidth_share"] < 10
    # Warm-up + 2 runs, each one 5-token prefill then exactly 3 one-token decode steps;
    # then perplexity: 40 ids -> 39 inputs, in context-sized (32) windows.
    assert calls == [5, 1, 1, 1] * 3 + [32, 7]
    # Both engines score the same ids with the same code: fp32 perplexities agree.
    llm = LLM.load(tiny, precision="32-true", device="cpu")
    reference = llm.perplexity(TEXT)
    # A token reads every weight but the input embedding (one row of it), unless that
    # table is also the head (tied and not repacked into a head of its own); a fused step
    # reads its head's int8 mirror instead of the float head.
    from parrot_cli.kernels.decode import attached

    assert parrot["weight_bytes"] == llm.weight_bytes()
    shared = getattr(llm.model.lm_head, "weight", None) is llm.model.transformer.wte.weight
    fused = attached(llm.model)
    if fused is not None:
        mirror = 112 * (64 + 6)  # int8 codes, bf16 scales and fp32 row errors of 112 rows
        assert fused.mirror_bytes() == mirror
        tables = (1 if shared else 2) * 112 * 64 * 4  # the float embedding (and head)
        assert parrot["bytes_per_token"] == parrot["weight_bytes"] - tables + 64 * 4
    else:
        assert parrot["bytes_per_token"] == parrot["weight_bytes"] - (0 if shared else 112 * 64 * 4)
    assert parrot["perplexity"] == pytest.approx(reference, rel=1e-6)
    assert peer["perplexity"] == pytest.approx(reference, rel=1e-4)
    ratios = parrot["vs"]["transformers"]
    assert ratios["perplexity"] == pytest.approx(1.0, rel=1e-4)
    assert ratios["tg"] == pytest.approx(parrot["tg_tokens_per_s"]["mean"] / peer["tg_tokens_per_s"]["mean"])
    assert "done:" in err


def test_sweeps_run_the_cross_product(tiny, capsys):
    from parrot_cli.bench import make_plan

    code, out, err = bench(
        capsys, "-m", str(tiny), "--precision", "32-true,bf16-true", "-p", "4", "-n", "2,3",
        "--threads", "1,2", "-r", "1", "--bandwidth", "10", "--csv",
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {"tg_tokens_per_s_mean", "tg_tokens_per_s_std", "peak_memory_bytes"} <= set(rows[0])
    got = {(r["precision"], r["gen_tokens"], r["threads"]) for r in rows}
    assert len(rows) == 8 and got == set(itertools.product(["32-true", "bf16-true"], ["2", "3"], ["1", "2"]))
    assert all(float(r["tg_tokens_per_s_mean"]) > 0 and not r["error"] for r in rows)
    # With peers, each comparable group of parrot rows is followed by its peer's row.
    plan = make_plan(str(tiny), precision=["32-true", "bf16-true"], gen_tokens=[2, 3],
                     quantize=["none"], vs=["transformers"])
    engines = [(c.engine, c.precision, c.gen_tokens) for c in plan.configs]
    assert engines == [(e, p, n) for p in ("32-true", "bf16-true") for n in (2, 3)
                       for e in ("parrot", "transformers")]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--threads", "0,x"], "--threads got '0'"),
        (["--precision", "fp7"], "--precision got 'fp7'; each value must be one of bf16-true"),
        (["--gen-tokens", "4,,8"], "--gen-tokens '4,,8' has an empty value"),
        (["--prompt-tokens", "12,"], "has an empty value"),
        (["--compile", "maybe"], "--compile got 'maybe'; each value must be on or off"),
        (["-r", "0"], "--repetitions must be at least 1"),
        (["--json", "--csv"], "at most one of --json"),
        (["--vs", "vllm"], "Unknown peer 'vllm'"),
        (["--bandwidth", "-1"], "--bandwidth must be a positive"),
    ],
)
def test_bad_values_are_one_line_usage_errors(tiny, capsys, args, fragment):
    code, out, err = bench(capsys, "--checkpoint-dir", str(tiny), *args)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert fragment in lines[0] and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is not None, reason="llama-cpp-python is installed")
def test_vs_llama_cpp_without_the_package_names_it(tiny, capsys):
    code, out, err = bench(capsys, "--checkpoint-dir", str(tiny), "--vs", "llama.cpp")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "parrot-cli[llamacpp]" in err and "--vs llama.cpp" in err


def test_failed_configuration_is_its_rows_error(tiny, capsys):
    code, out, err = bench(capsys, "--checkpoint-dir", str(tiny), "--quantize", "none,no-such-mode",
                           "--precision", "32-true", "-p", "4", "-n", "2", "-r", "1", "--markdown")
    assert code == 1
    table = out.splitlines()
    assert table[0].startswith("| quantize |") and "error" in table[0]
    good, bad = table[2], table[3]
    assert good.startswith("| none |") and "±" in good
    assert bad.startswith("| no-such-mode |") and "no-such-mode" in bad.split("|")[-2]
    assert err.strip().endswith("1 of 2 configurations failed; see the error column.")
    # The context limit is a configuration error too, named in one sentence.
    code, out, err = bench(capsys, "--checkpoint-dir", str(tiny), "-p", "30", "-n", "8", "-r", "1", "--json")
    row = json.loads(out)["results"][0]
    assert code == 1 and "do not fit the 32-token context" in row["error"]


def test_ctrl_c_prints_what_was_measured(tiny, capsys):
    # A real SIGINT, raised as the second configuration starts its second timed run
    # (3 forward calls a run: the first configuration takes 9, the second's warm-up 3 more).
    def interrupt(n: int) -> None:
        if n == 9 + 3 + 3 + 1:
            signal.raise_signal(signal.SIGINT)

    with forward_lengths(interrupt):
        code, out, err = bench(capsys, "--checkpoint-dir", str(tiny), "-p", "4", "-n", "2",
                               "--threads", "1,2", "-r", "2", "--json")
    assert code == 130 and "Interrupted." in err
    report = json.loads(out)
    assert report["interrupted"] is True
    first, partial = report["results"]
    assert first["error"] is None and len(first["tg_tokens_per_s"]["samples"]) == 2
    assert partial["interrupted"] is True and len(partial["tg_tokens_per_s"]["samples"]) == 1


def test_peak_memory_is_per_configuration():
    from parrot_cli.machine import PeakMemory

    memory = PeakMemory("cpu")
    assert memory.method == "rss-peak"
    memory.reset()
    big = torch.ones(64 * 1024**2)  # 256 MB
    del big
    baseline = memory.reset()
    assert memory.peak() < baseline + 64 * 1024**2  # the earlier 256 MB no longer counts
    big = torch.ones(64 * 1024**2)
    assert memory.peak() >= baseline + 200 * 1024**2
    del big


def test_real_command_prints_a_table(tiny):
    result = run_parrot("bench", "--checkpoint-dir", str(tiny), "-p", "4", "-n", "2",
                        "--precision", "32-true,bf16-true", "-r", "1", "--bandwidth", "20")
    assert result.returncode == 0, result.stderr
    assert "pp t/s" in result.stdout and "tg t/s" in result.stdout and "peak mem (+load)" in result.stdout
    assert "32-true" in result.stdout and "bf16-true" in result.stdout
    assert "20.0 GB/s (given)" in result.stdout
    assert result.stderr.count("done:") == 2 and "Traceback" not in result.stderr


@pytest.mark.smollm2
def test_peer_loads_the_registry_source_of_a_known_model(smollm2_checkpoint, smollm2_gguf):
    from parrot_cli.bench import peer_weights
    from parrot_cli.checkpoint.store import read_info

    info = read_info(smollm2_checkpoint)
    assert info.provenance["format"] == "gguf"
    assert peer_weights("transformers", info.provenance, smollm2_checkpoint) == smollm2_gguf
