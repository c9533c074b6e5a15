"""Multi-device inference on CPU with gloo, 2 ranks (1 thread each): every strategy gives the
tokens and logits of one device, through every way in (torchrun, parrot's own ranks, the LLM
API, the CLI, piped chat), and bad input or a dead rank ends everything in seconds.

Cost control: one torchrun world (two processes, one torch import each) runs every family x
strategy check and the real SmolLM2 (tests/dist_harness.py); the end-to-end paths each start
one world. Single-device references are computed in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import psutil
import pytest
import torch

from parrot_cli import LLM
from parrot_cli.checkpoint.convert import convert
from parrot_cli.checkpoint.load import build_model
from parrot_cli.checkpoint.store import read_info
from parrot_cli.config import Config
from parrot_cli.distributed.layout import Launch, layer_split, plan_layout, tensor_split
from parrot_cli.distributed.tp import TensorParallelShard, qkv_rows
from parrot_cli.errors import UsageError
from parrot_cli.generation import SamplingParams
from tests.conftest import run_parrot
from tests.hf_factory import CASES_BY_ID, Case, _llama, build, sample_ids

# One case per trait the split must survive: GQA + biases, MQA, MHA + biases, and the
# parallel-residual blocks (NeoX; Falcon with one shared norm and with two).
FAMILIES = ("llama-bias", "llama-mqa", "falcon-7b-mqa", "falcon-40b-newarch-ln2",
            "neox-parallel-rot25", "falcon-sequential-bias")
STRATEGIES = ("tp", "sequential", "fsdp", "fsdp-offload")
MAX_NEW = 10
ATOL = 1e-4
REFERENCE_TEXT = " Alex, and I'm a professional coach. I've been"  # SmolLM2, greedy, 12 tokens
ROOT = Path(__file__).parent.parent


def _convert(case: Case, where: Path) -> Path:
    return convert(build(case, where / "hf"), where / "parrot", dtype="float32")


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    return {cid: _convert(CASES_BY_ID[cid], tmp_path_factory.mktemp(cid)) for cid in FAMILIES}


@pytest.fixture(scope="module")
def stored(families, tmp_path_factory) -> dict[str, Path]:
    """Quantized checkpoints in the portable layout (written as tests/test_quantized_format.py
    does): int4 linears; int4 linears with an int8 embedding a tied head reads; int8 throughout."""
    from tests.test_quantized_format import write_quantized

    where = tmp_path_factory.mktemp("stored")
    tied = _convert(CASES_BY_ID["llama-gqa-tied"], where / "tied-float")
    return {
        "int4": write_quantized(families["neox-parallel-rot25"], where / "int4", embedding=False, bits=4),
        "int4-tied-embedding": write_quantized(tied, where / "int4-tied", embedding=True, bits=4),
        "int8-tied-embedding": write_quantized(tied, where / "int8-tied", embedding=True, bits=8),
        "int4-llama-bias": write_quantized(families["llama-bias"], where / "int4-bias", embedding=False, bits=4),
    }


STORED_JOBS = {  # job -> (stored checkpoint, strategy, the case its ids come from)
    "stored-int4/tp": ("int4", "tp", "neox-parallel-rot25"),
    "stored-int4-tied-embedding/sequential": ("int4-tied-embedding", "sequential", "llama-gqa-tied"),
    "stored-int8-tied-embedding/tp": ("int8-tied-embedding", "tp", "llama-gqa-tied"),
}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm2_checkpoint) -> Path:
    """A tiny random Llama (GQA 4/2, biases) with SmolLM2's vocabulary and tokenizer, so the
    text paths (generate, chat) run on a model whose heads split over two ranks."""
    case = Case("llama-bias-smollm2-vocab", "llama",
                _llama(attention_bias=True, mlp_bias=True, vocab_size=49152, max_position_embeddings=128))
    out = _convert(case, tmp_path_factory.mktemp("chat"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_checkpoint / name, out / name)
    return out


def _reference(checkpoint: Path, ids: list[int], quantize: str | None = None) -> tuple[list[int], torch.Tensor]:
    """One device's greedy tokens and logits (computed once per checkpoint, ids and mode:
    every strategy of a family compares with the same reference)."""
    return _REFERENCES.get((checkpoint, tuple(ids), quantize)) or _REFERENCES.setdefault(
        (checkpoint, tuple(ids), quantize), _one_device(checkpoint, ids, quantize))


_REFERENCES: dict[tuple, tuple[list[int], torch.Tensor]] = {}


def _one_device(checkpoint: Path, ids: list[int], quantize: str | None) -> tuple[list[int], torch.Tensor]:
    llm = LLM.load(checkpoint, precision="32-true", device="cpu", quantize=quantize)
    llm.ensure_cache(len(ids) + MAX_NEW)
    with torch.inference_mode():
        tokens = list(llm.tokens(ids, max_new_tokens=MAX_NEW, params=SamplingParams(temperature=0.0)))
    return tokens, llm.logits(ids + tokens[:-1])


# ----------------------------------------------------------------------------- one world


def _jobs(families: dict[str, Path], stored: dict[str, Path], smollm2: Path) -> list[dict]:
    jobs = []
    for name, (checkpoint, strategy, case) in STORED_JOBS.items():
        jobs.append({"name": name, "checkpoint": str(stored[checkpoint]), "strategy": strategy,
                     "ids": sample_ids(CASES_BY_ID[case], 8), "max_new": MAX_NEW})
    for cid, path in families.items():
        ids = sample_ids(CASES_BY_ID[cid], 8)
        for strategy in STRATEGIES:
            jobs.append({"name": f"{cid}/{strategy}", "checkpoint": str(path), "ids": ids, "max_new": MAX_NEW,
                         "strategy": strategy.split("-")[0], "cpu_offload": strategy.endswith("offload")})
    gqa = families["llama-bias"]
    ids = sample_ids(CASES_BY_ID["llama-bias"], 8)
    jobs.append({"name": "naive-qkv", "checkpoint": str(gqa), "ids": ids, "max_new": MAX_NEW,
                 "strategy": "tp", "naive_qkv": True})
    jobs.append({"name": "tp-int8", "checkpoint": str(gqa), "ids": ids, "max_new": MAX_NEW,
                 "strategy": "tp", "quantize": "int8"})
    jobs.append({"name": "sequential-int4", "checkpoint": str(gqa), "ids": ids, "max_new": MAX_NEW,
                 "strategy": "sequential", "quantize": "int4"})
    # fsdp gathers all 540 MB of SmolLM2 through gloo for every token (~1 s each here): its
    # check decodes the reference's first 4 tokens, sequential all 12.
    for strategy, max_new in (("sequential", 12), ("fsdp", 4)):
        jobs.append({"name": f"smollm2/{strategy}", "checkpoint": str(smollm2), "ids": [], "max_new": max_new,
                     "strategy": strategy, "text": "Hello, my name is"})
    return jobs


@pytest.fixture(scope="module")
def world(families, stored, smollm2_checkpoint, tmp_path_factory) -> dict[str, dict]:
    """Every job of `_jobs`, run in one torchrun world of two ranks."""
    where = tmp_path_factory.mktemp("world")
    jobs, out = where / "jobs.json", where / "out.json"
    jobs.write_text(json.dumps(_jobs(families, stored, smollm2_checkpoint)))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "tests.dist_harness", str(jobs), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.mark.smollm2
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", FAMILIES)
def test_strategy_gives_the_tokens_and_logits_of_one_device(world, families, family, strategy):
    ids = sample_ids(CASES_BY_ID[family], 8)
    tokens, logits = _reference(families[family], ids)
    got = world[f"{family}/{strategy}"]
    assert got["tokens"] == tokens
    torch.testing.assert_close(torch.tensor(got["logits"]), logits, atol=ATOL, rtol=0)
    assert [m["rank"] for m in got["memory"]] == [0, 1]
    if strategy != "tp":  # the same operations in the same order: bitwise equal
        assert torch.equal(torch.tensor(got["logits"]), logits)


@pytest.mark.smollm2
def test_each_rank_holds_only_its_part(world, families):
    """Weight bytes per rank: tp and fsdp about half of one device each; sequential its
    half of the blocks (plus the embedding on rank 0 and the head on rank 1)."""
    from parrot_cli.kernels import native

    with native.turned_off():  # ranks run torch's modules: compare with one device doing the same
        whole = LLM.load(families["llama-bias"], precision="32-true", device="cpu").weight_bytes()
    for strategy in ("tp", "sequential", "fsdp"):
        per_rank = [m["weight_bytes"] for m in world[f"llama-bias/{strategy}"]["memory"]]
        assert all(b < 0.75 * whole for b in per_rank), (strategy, per_rank, whole)
        assert sum(per_rank) >= whole * (0.99 if strategy != "tp" else 0.9)


@pytest.mark.smollm2
def test_a_naive_split_of_the_fused_qkv_gives_wrong_logits(world, families):
    ids = sample_ids(CASES_BY_ID["llama-bias"], 8)
    _, logits = _reference(families["llama-bias"], ids)
    naive = world["naive-qkv"]
    # Compare the prompt positions only (the naive run decodes other tokens after them).
    diff = (torch.tensor(naive["logits"])[: len(ids)] - logits[: len(ids)]).abs().max()
    assert diff > 0.1, f"contiguous qkv shards gave the right logits ({diff:.2e}): the test cannot see the bug"
    assert world["llama-bias/tp"]["tokens"] != naive["tokens"] or diff > 0.1


@pytest.mark.smollm2
@pytest.mark.parametrize(("job", "mode"), [("tp-int8", "int8"), ("sequential-int4", "int4")])
def test_quantized_weights_split_too(world, families, job, mode):
    ids = sample_ids(CASES_BY_ID["llama-bias"], 8)
    tokens, logits = _reference(families["llama-bias"], ids, quantize=mode)
    got = world[job]
    assert got["tokens"] == tokens
    _close_in_bf16(torch.tensor(got["logits"]), logits, exact=not job.startswith("tp"))


def _close_in_bf16(got: torch.Tensor, expected: torch.Tensor, *, exact: bool) -> None:
    """int4/int8 layers compute in bf16: under tp each rank's partial sum is rounded before
    the all-reduce, which moves the logits by about bf16's precision of the hidden states
    (as tests/test_quantized_format.py allows, 1% of the largest logit); a pipeline runs the
    same operations as one device and must match exactly."""
    if exact:
        assert torch.equal(got, expected)
        return
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.smollm2
@pytest.mark.parametrize("job", STORED_JOBS)
def test_quantized_checkpoints_split_too(world, stored, job):
    checkpoint, strategy, case = STORED_JOBS[job]
    ids = sample_ids(CASES_BY_ID[case], 8)
    tokens, logits = _reference(stored[checkpoint], ids)
    got = world[job]
    assert got["tokens"] == tokens
    _close_in_bf16(torch.tensor(got["logits"]), logits, exact=strategy != "tp")


def test_quantized_layers_that_cannot_be_cut_are_refused(stored):
    # llama-bias's MLP is 96 wide: 48 inputs a rank do not hold whole groups of 32.
    with pytest.raises(UsageError, match="cuts mlp.proj inside its quantization groups of 32; use --strategy sequential"):
        LLM.load(stored["int4-llama-bias"], device="cpu", strategy="tp", devices=2)


@pytest.mark.smollm2
@pytest.mark.parametrize("strategy", ["sequential", "fsdp"])
def test_real_smollm2_keeps_the_reference_text(world, strategy):
    got = world[f"smollm2/{strategy}"]
    if strategy == "sequential":
        assert got["text"] == REFERENCE_TEXT
    else:  # 4 tokens: " Alex, and I"
        assert got["text"] == REFERENCE_TEXT[: len(" Alex, and I")]
    if strategy == "fsdp":
        assert any("trades speed for memory" in n for n in got["notes"])


# ----------------------------------------------------------------------------- one process


def test_fused_rows_take_each_rank_its_own_heads():
    config = Config(family="llama", vocab_size=16, n_layer=1, n_head=4, n_embd=32, intermediate_size=16,
                    block_size=8, n_query_groups=2, head_size=4)
    split = tensor_split(config, 2)
    rows = [qkv_rows(config, split, r).tolist() for r in range(2)]
    q, kv = 4 * 4, 2 * 4
    assert rows[0] == list(range(0, 8)) + list(range(q, q + 4)) + list(range(q + kv, q + kv + 4))
    assert rows[1] == list(range(8, 16)) + list(range(q + 4, q + 8)) + list(range(q + kv + 4, q + kv + 8))
    mqa = Config(**{**config.to_dict(), "n_query_groups": 1})
    split = tensor_split(mqa, 2)
    assert split.n_kv == 1 and split.kv_replicas == 2  # the one kv head is on both ranks
    both = [qkv_rows(mqa, split, r)[8:].tolist() for r in range(2)]
    assert both[0] == both[1] == list(range(16, 24))


@pytest.mark.parametrize("family", ["llama-bias", "falcon-sequential-bias", "neox-parallel-rot25"])
def test_shards_sum_to_the_whole_layer_and_a_contiguous_cut_does_not(family, tmp_path):
    """The algebra behind tp without any process group: the two ranks' attention and MLP
    outputs (row-parallel bias on rank 0 only) add up to the whole layer's output."""
    path = _convert(CASES_BY_ID[family], tmp_path)
    config = read_info(path).config
    whole = build_model(config, path, torch.device("cpu"), torch.float32)
    parts = [build_model(config, path, torch.device("cpu"), torch.float32,
                         shard=TensorParallelShard(config, r, 2)) for r in range(2)]
    x = torch.randn(1, 5, config.n_embd, generator=torch.Generator().manual_seed(0))
    cos, sin = whole.rope(torch.arange(5), seq_len=5)

    def attn(model):
        return model.transformer.h[0].attn(x, cos, sin, None, 5, None)

    with torch.inference_mode():
        torch.testing.assert_close(sum(attn(p) for p in parts), attn(whole), atol=1e-5, rtol=0)
        mlp = whole.transformer.h[0].mlp(x)
        torch.testing.assert_close(sum(p.transformer.h[0].mlp(x) for p in parts), mlp, atol=1e-5, rtol=0)
        naive = [build_model(config, path, torch.device("cpu"), torch.float32,
                             shard=_ContiguousQKV(config, r, 2)) for r in range(2)]
        assert (sum(attn(p) for p in naive) - attn(whole)).abs().max() > 1e-2


class _ContiguousQKV(TensorParallelShard):
    """The mistake: each rank a contiguous block of the fused [q; k; v] rows."""

    def __init__(self, config, rank, size):
        super().__init__(config, rank, size)
        n = len(self.rows["attn.qkv"])
        self.rows["attn.qkv"] = torch.arange(rank * n, (rank + 1) * n)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_shards_keep_the_codes_of_one_device(mode):
    from parrot_cli.quantize.weight_only import quantize_int4, quantize_int8

    config = Config(family="llama", vocab_size=16, n_layer=1, n_head=4, n_embd=64, intermediate_size=64,
                    block_size=8, n_query_groups=2, mlp_class="GatedMLP")
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    qw = quantize_int8(weight) if mode == "int8" else quantize_int4(weight, 32)
    shards = [TensorParallelShard(config, r, 2) for r in range(2)]
    cols = [s.take("transformer.h.0.attn.proj.weight", qw).dequantize() for s in shards]
    torch.testing.assert_close(torch.cat(cols, dim=1), qw.dequantize())
    fused = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    qf = quantize_int8(fused) if mode == "int8" else quantize_int4(fused, 32)
    rows = [s.take("transformer.h.0.mlp.fc.weight", qf).dequantize() for s in shards]
    # [gate; up] per part: rank 0 holds gate[:32] and up[:32].
    torch.testing.assert_close(rows[0], torch.cat([qf.dequantize()[:32], qf.dequantize()[64:96]]))


def test_layer_split_is_contiguous_and_even():
    assert layer_split(30, 2) == [range(0, 15), range(15, 30)]
    assert layer_split(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(UsageError, match="more than the model's 2 layers"):
        layer_split(2, 3)


@pytest.mark.smollm2
def test_impossible_requests_are_usage_errors_before_anything_starts(smollm2_checkpoint):
    config = read_info(smollm2_checkpoint).config

    def plan(**kw):
        return plan_layout(kw.pop("strategy", None), kw.pop("devices", None), config=config, device_type="cpu", **kw)

    cases = [
        ({"strategy": "tp", "devices": 2}, "9 attention heads do not split over 2 devices; use --strategy sequential (or --devices 3)"),
        ({"strategy": "sequential", "devices": 2, "cpu_offload": True}, "--cpu-offload applies to --strategy fsdp only"),
        ({"strategy": "sequential", "devices": 64}, "more than this machine's"),
        ({"strategy": "sequential", "devices": 3, "launch": Launch(0, 2, 0, 2)}, "torchrun started 2 processes but --devices says 3"),
        ({"strategy": "fsdp", "devices": 2, "quantized": True}, "shards float weights"),
        ({"strategy": "sequential", "devices": 2, "compile": True}, "--compile does not combine"),
        ({"strategy": "pipeline", "devices": 2}, "Unknown strategy 'pipeline'"),
        ({"strategy": "tp"}, "needs --devices N"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plan(**kwargs)
    assert plan(devices=2).strategy == "sequential"  # not chosen: tp when the heads split, else sequential
    for kwargs, _ in cases[:3]:  # the same sentences through LLM.load, before any process starts
        with pytest.raises(UsageError):
            LLM.load(smollm2_checkpoint, device="cpu", **kwargs)


# ----------------------------------------------------------------------------- ways in


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}


def _watch(args: list[str], *, input: str | None = None, env: dict | None = None, timeout: float = 180):
    """Run a command, noting every process it starts; returns (returncode, stdout, stderr,
    the pids seen). Children start with the default SIGINT handler."""
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: set[int] = set()
    if input is not None:
        proc.stdin.write(input)
    proc.stdin.close()
    proc.stdin = None  # communicate() below only collects the output
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _descendants(proc.pid)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    return proc.returncode, out, err, seen


PARROT = [sys.executable, "-m", "parrot_cli"]
GREEDY = ["--temperature", "0", "--max-new-tokens", "10", "--precision", "32-true", "--device", "cpu"]


@pytest.mark.smollm2
def test_llm_api_starts_and_stops_its_ranks(chat_model):
    one = LLM.load(chat_model, precision="32-true", device="cpu")
    two = LLM.load(chat_model, precision="32-true", device="cpu", strategy="tp", devices=2)
    try:
        worker = set(two.ranks.world.workers.pids())
        assert len(worker) == 1 and _alive(worker)
        for prompt in ("The capital of France is", [{"role": "user", "content": "Hi!"}]):
            assert two.generate(prompt, temperature=0, max_new_tokens=10) == one.generate(prompt, temperature=0, max_new_tokens=10)
        assert "".join(two.stream("Once upon", temperature=0, max_new_tokens=6)) == one.generate("Once upon", temperature=0, max_new_tokens=6)
        # A consumer that stops early leaves the ranks in step for the next call.
        stream = two.stream("Once upon", temperature=0, max_new_tokens=50)
        next(stream)
        stream.close()
        abandoned = two.stream("Once upon", temperature=0, max_new_tokens=50)
        next(abandoned)  # never read further nor closed: the next call ends it on every rank
        assert two.chat([{"role": "user", "content": "Hi!"}], temperature=0, max_new_tokens=5) == \
            one.chat([{"role": "user", "content": "Hi!"}], temperature=0, max_new_tokens=5)
        assert two.perplexity("A short text to score.") == pytest.approx(one.perplexity("A short text to score."), rel=1e-4)
        sampled = [two.generate("Hi", temperature=1.0, seed=3, max_new_tokens=8) for _ in range(2)]
        assert sampled[0] == sampled[1] == one.generate("Hi", temperature=1.0, seed=3, max_new_tokens=8)
        # Ctrl-C mid-reply (as in a chat): it waits for the step in flight to end on every
        # rank, so the ranks stay in step and the next reply is the same as ever.
        stream = two.stream("Once upon a time", temperature=0, max_new_tokens=100)
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()
                time.sleep(0.5)
        stream.close()
        assert two.generate("Hi", temperature=0, max_new_tokens=8) == one.generate("Hi", temperature=0, max_new_tokens=8)
    finally:
        two.close()
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker), "a rank outlived close()"
    # A second world in the same process (bench loads one per configuration).
    with LLM.load(chat_model, precision="32-true", device="cpu", strategy="sequential", devices=2) as again:
        assert again.generate("Hi", temperature=0, max_new_tokens=8) == one.generate("Hi", temperature=0, max_new_tokens=8)


@pytest.mark.smollm2
def test_generate_starts_its_own_ranks_and_reports_each_ones_memory(chat_model):
    expected = LLM.load(chat_model, precision="32-true", device="cpu").generate(
        "The capital of France is", temperature=0, max_new_tokens=10)
    code, out, err, seen = _watch([*PARROT, "generate", "The capital of France is", "-m", str(chat_model),
                                   *GREEDY, "--strategy", "tp", "--devices", "2"])
    assert code == 0, err
    assert out == expected + "\n"
    assert "rank 0" in err and "rank 1" in err and "tp over 2 processes" in err
    assert seen and not _alive(seen)


@pytest.mark.smollm2
def test_piped_chat_over_a_pipeline(chat_model):
    from parrot_cli.chat import ChatSession
    from parrot_cli.cli.chat import run_piped

    one = LLM.load(chat_model, precision="32-true", device="cpu", settings=None)
    expected = StringIO()
    session = ChatSession(one, overrides={"temperature": 0, "max_new_tokens": 8})
    run_piped(session, StringIO("Hi\nAgain?\n"), expected, multiline=False, quiet=True)
    code, out, err, seen = _watch([*PARROT, "chat", "-m", str(chat_model), "-q", "--temperature", "0",
                                   "--max-new-tokens", "8", "--precision", "32-true", "--device", "cpu",
                                   "--strategy", "sequential", "--devices", "2"], input="Hi\nAgain?\n")
    assert code == 0, err
    assert out == expected.getvalue() and out.count("\n") == 2
    assert seen and not _alive(seen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.smollm2
def test_torchrun_two_nodes_on_loopback(chat_model):
    expected = LLM.load(chat_model, precision="32-true", device="cpu").generate(
        "The capital of France is", temperature=0, max_new_tokens=10)
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "parrot-test", "-m", "parrot_cli", "generate", "The capital of France is",
             "-m", str(chat_model), *GREEDY, "--strategy", "sequential"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    texts = sorted(o[0] for o in outs)
    assert texts == ["", expected + "\n"]  # only rank 0 prints


@pytest.mark.smollm2
def test_torchrun_world_that_disagrees_with_devices(chat_model):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "parrot_cli", "generate", "Hi", "-m", str(chat_model), *GREEDY, "--strategy", "sequential",
         "--devices", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert ours == ["Error: torchrun started 2 processes but --devices says 3; drop --devices or make the two agree."]


@pytest.mark.smollm2
def test_cli_bad_combination_is_one_line(chat_model):
    result = run_parrot("generate", "Hi", "-m", str(chat_model), "--cpu-offload", "--strategy", "tp", "--devices", "2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: --cpu-offload applies to --strategy fsdp only (it keeps the weight shards in CPU memory)."
    ]


def _start_long_generation(chat_model: Path, strategy: str) -> tuple[subprocess.Popen, int]:
    """A generation that runs for a while; returns it and its one worker's pid, once text flows."""
    proc = subprocess.Popen(
        [*PARROT, "generate", "The", "-m", str(chat_model), "--temperature", "0", "--max-new-tokens", "100000",
         "--max-seq-length", "128", "--precision", "32-true", "--device", "cpu", "--strategy", strategy,
         "--devices", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.stdout.read(1):
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    assert len(workers) == 1, workers
    return proc, workers.pop()


@pytest.mark.smollm2
def test_a_killed_rank_ends_the_others_with_one_sentence(chat_model):
    proc, worker = _start_long_generation(chat_model, "sequential")
    started = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1, err
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines[-1] == f"Error: Rank 1 (pid {worker}) was killed by SIGKILL. The other ranks stopped.", lines
    assert "Traceback" not in err.decode()
    assert not _alive({worker})


@pytest.mark.smollm2
def test_a_killed_rank_0_takes_its_ranks_with_it(chat_model):
    proc, worker = _start_long_generation(chat_model, "sequential")
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while _alive({worker}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive({worker}), "a rank outlived rank 0"


@pytest.mark.smollm2
def test_bench_compares_strategies_with_one_device_in_one_run(chat_model):
    code, out, err, seen = _watch([*PARROT, "bench", "-m", str(chat_model), "--strategy", "none,tp", "--devices", "2",
                                   "-p", "8", "-n", "4", "-r", "1", "--precision", "32-true", "--device", "cpu",
                                   "--bandwidth", "10", "--json"])
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert [r["strategy"] for r in rows] == [None, "tp"]
    assert rows[0]["rank_memory"] == [] and [m["rank"] for m in rows[1]["rank_memory"]] == [0, 1]
    assert all(r["error"] is None and r["decode_steps"] == [4] for r in rows)
    assert seen and not _alive(seen)


@pytest.mark.smollm2
def test_ctrl_c_stops_every_rank(chat_model):
    proc, worker = _start_long_generation(chat_model, "tp")
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err.decode()
    deadline = time.monotonic() + 15
    while _alive({worker}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive({worker})
