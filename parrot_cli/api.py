"""`LLM`: load a model once, then answer many prompts ("warm, then infer").

The CLI and Python users share this object; the CLI never reaches around it. Text flows
one way: prompt -> tokenizer -> model (+ KV cache) -> sampler -> detokenizer -> stream.
"""

from __future__ import annotations

import atexit
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from parrot_cli.checkpoint.info import CheckpointInfo, read_info, read_json
from parrot_cli.checkpoint.load import build_model, page_release
from parrot_cli.checkpoint.locate import locate
from parrot_cli.config import Config
from parrot_cli.errors import (
    CheckpointError,
    ContextLengthError,
    OutOfMemoryError,
    ParrotError,
    UsageError,
    is_out_of_memory,
)
from parrot_cli.generation import ALONE, SamplingParams, generate_tokens
from parrot_cli.kernels import can_pack, pack_linears
from parrot_cli.kernels.decode import attach as attach_fused_decode
from parrot_cli.kernels.decode import attached as attached_decoder
from parrot_cli.kernels.native import library as native_library
from parrot_cli.kernels.native import widen_bf16_linears
from parrot_cli.machine import cpu_has_native_bf16
from parrot_cli.model import GPT
from parrot_cli.quantize import QuantSpec, resolve_mode
from parrot_cli.quantize import plan as plan_quantization
from parrot_cli.quantize.qconfig import QuantizationConfig, read_quantization_config
from parrot_cli.resources import check_memory, human_bytes, memory_available
from parrot_cli.settings import PRECISIONS, Settings
from parrot_cli.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer

if TYPE_CHECKING:
    from parrot_cli.distributed.launch import World
    from parrot_cli.distributed.layout import Layout
    from parrot_cli.distributed.runtime import LoadRequest, Ranks
    from parrot_cli.prompt_styles import PromptStyle

Prompt = str | list[dict[str, str]]  # raw text, or chat messages for the chat template
CACHE_NOTICE_BYTES = 1024**3  # say how much memory a KV cache takes above this


@dataclass
class GenerationResult:
    """What one generation produced, with the numbers `parrot generate` reports."""

    text: str = ""
    finish_reason: str = "length"  # "eos" | "stop" | "length"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # every sampled id, EOS included
    time_to_first_token: float = 0.0  # seconds, prefill + first sample
    seconds: float = 0.0  # whole generation

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        decode = self.seconds - self.time_to_first_token
        return (self.generated_tokens - 1) / decode if self.generated_tokens > 1 and decode > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": round(self.time_to_first_token, 4),
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
        }


class TextStream:
    """Iterator of text pieces; after exhaustion `.result` holds the GenerationResult."""

    def __init__(self, pieces: Iterator[str], result: GenerationResult) -> None:
        self._pieces = pieces
        self.result = result

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop early: a consumer that leaves the loop (Ctrl-C in a chat) ends generation here,
        so torch's inference mode and the generator's frame do not outlive the reply."""
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"Device {device!r} was asked for, but torch sees no CUDA GPU here.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("Device 'mps' was asked for, but it is not available here.")
    return dev


def default_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    if device.type == "mps":
        return "16-true"
    return "bf16-true" if cpu_has_native_bf16() else "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    table = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}
    if precision not in table:
        raise UsageError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return table[precision]


def _plan_layout(settings: Settings, config: Config, device: torch.device, stored: QuantizationConfig | None):
    """The multi-device layout the settings ask for (None: one device here)."""
    from parrot_cli.distributed.layout import plan_layout, torchrun_launch

    return plan_layout(
        settings.get("strategy"),
        settings.get("devices"),
        config=config,
        device_type=device.type,
        cuda_devices=torch.cuda.device_count() if device.type == "cuda" else 0,
        cpu_offload=settings.get("cpu_offload"),
        backend=settings.get("dist_backend"),
        timeout=settings.get("dist_timeout"),
        threads=settings.get("threads"),
        compile=bool(settings.get("compile")),
        quantized=stored is not None or resolve_mode(settings.get("quantize")) is not None,
        stored_modules=stored.modules if stored is not None else None,
        launch=torchrun_launch(),
    )


def _rank_config(layout: Layout | None, config: Config) -> Config:
    """The config one rank builds (tensor parallel: its share of the heads)."""
    if layout is None or layout.strategy != "tp":
        return config
    from parrot_cli.distributed.layout import tensor_split

    return tensor_split(config, layout.world_size).config(config)


def peak_memory_bytes(device: torch.device) -> int:
    """Max allocated on CUDA; peak resident set size of the process on CPU. On Linux this
    reads VmHWM: ru_maxrss survives exec, so a child of a large process would report its
    parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class LLM:
    """A loaded model with its tokenizer, settings and (reused) KV cache."""

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None,
        config: Config,
        checkpoint_dir: Path,
        settings: Settings,
        device: torch.device,
        precision: str,
        fixed_max_seq_length: int | None = None,
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.config = config
        self.checkpoint_dir = checkpoint_dir
        self.settings = settings
        self.device = device
        self.precision = precision
        self.fixed_max_seq_length = fixed_max_seq_length
        self.load_seconds = 0.0
        self.quantization: QuantSpec | None = None  # what LLM.load quantized, if anything
        self.stored_quantization: QuantizationConfig | None = None  # what the checkpoint holds
        # What runs a decode step: "native avx2" (the fused step, kernels/decode.py) or "torch".
        self.decode_kernel = "torch"
        # Called with one-line notices (e.g. a large KV cache); the CLI prints them dimmed.
        self.notify: Callable[[str], None] = lambda message: None
        # A multi-device model: how it is split, and this rank's side of the lockstep.
        self.layout: Layout | None = None
        self.ranks: Ranks | None = None
        self.notes: list[str] = []  # what loading wants the user told once (the CLI prints them)
        self._generation: Iterator[int] | None = None  # the token loop in progress, if any

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        precision: str | None = None,
        quantize: str | None = None,
        max_seq_length: int | None = None,
        compile: bool = False,
        threads: int | None = None,
        strategy: str | None = None,
        devices: int | None = None,
        settings: Settings | None = None,
        group_size: int | None = None,
        quantize_head: bool | None = None,
        cpu_offload: bool | None = None,
        dist_backend: str | None = None,
        dist_timeout: float | None = None,
    ) -> LLM:
        """Load a checkpoint directory or known model name (None = the configured default).
        `quantize` names a mode of `parrot_cli.quantize.MODES` (the Linears of every block,
        and the head with `quantize_head`, quantized while loading); `group_size` is int4's.

        `strategy` ("tp", "sequential", "fsdp") with `devices` N splits the model over N
        ranks (`parrot_cli/distributed/`): this process is rank 0 and starts the others
        (on CPU one process per device, each with its share of the cores), which end with
        `close()` (or at exit). `devices` None means 1, or torchrun's world size when the
        process was started by torchrun; there `load` on a rank other than 0 serves rank 0
        until it closes the model, then ends the process. Every method of the returned LLM
        works as on one device (each model operation runs on all ranks)."""
        start = time.perf_counter()
        flags = {
            "model": str(model) if model is not None else None,
            "device": None if device == "auto" else device,
            "precision": precision,
            "quantize": quantize,
            "max_seq_length": max_seq_length,
            "compile": compile or None,
            "threads": threads,
            "group_size": group_size,
            "quantize_head": quantize_head,
            "strategy": strategy,
            "devices": devices,
            "cpu_offload": cpu_offload,
            "dist_backend": dist_backend,
            "dist_timeout": dist_timeout,
        }
        settings = (settings or Settings()).with_flags(**flags)
        resolve_mode(settings.get("quantize"))  # an unknown mode fails before anything else
        checkpoint_dir = locate(settings.get("model"))
        info = read_info(checkpoint_dir)
        stored = read_quantization_config(checkpoint_dir)
        dev = pick_device(settings.get("device"))
        prec = settings.get("precision") or default_precision(dev)
        dtype = precision_dtype(prec)
        # Every impossible request (bnb missing, wrong device, group size, a split that
        # does not fit) fails here, before a process starts or a weight is read.
        layout = _plan_layout(settings, info.config, dev, stored)
        quantization = plan_quantization(
            settings.get("quantize"),
            _rank_config(layout, info.config),
            dev,
            group_size=settings.get("group_size"),
            group_size_from_user=settings.source("group_size") == "flag",
            quantize_head=settings.get("quantize_head"),
            provenance=info.provenance,
            stored=stored,
        )
        if threads := settings.get("threads"):
            torch.set_num_threads(threads)
        generation_config = read_json(checkpoint_dir / "generation_config.json")
        settings = settings.with_checkpoint(generation_config)
        tokenizer = (
            Tokenizer.from_dir(checkpoint_dir)
            if (checkpoint_dir / "tokenizer.json").is_file()
            else None
        )
        fixed = settings.get("max_seq_length")
        if fixed is not None and not 0 < fixed <= info.config.block_size:
            raise UsageError(
                f"--max-seq-length {fixed} is outside 1..{info.config.block_size} (the model's context)."
            )
        decode_kernel = "torch"
        if layout is not None:
            from parrot_cli.distributed.runtime import LoadRequest

            request = LoadRequest(str(checkpoint_dir), prec, quantization, layout, fixed)
            gpt, world, ranks = cls._load_part(request)
            dev = world.device
        else:
            gpt, decode_kernel = cls._load_whole(
                info, checkpoint_dir, dev, dtype, prec, quantization, stored, bool(settings.get("compile"))
            )
        llm = cls(gpt, tokenizer, info.config, checkpoint_dir, settings, dev, prec, fixed)
        llm.quantization = quantization
        llm.stored_quantization = stored
        llm.decode_kernel = decode_kernel
        if layout is not None:
            llm.layout, llm.ranks, llm.notes = layout, ranks, list(layout.notes)
        if settings.get("compile"):
            llm._compile()
        llm.load_seconds = time.perf_counter() - start
        return llm

    @staticmethod
    def _load_whole(
        info: CheckpointInfo, checkpoint_dir: Path, dev: torch.device, dtype: torch.dtype, prec: str,
        quantization: QuantSpec | None, stored: QuantizationConfig | None, compile: bool,
    ) -> tuple[GPT, str]:
        """The model on one device, and what runs its decode step: the fused native step
        where it applies (one call a token; "native ISA"), otherwise torch's modules
        ("torch") with oneDNN-prepacked linears (inductor, under --compile, cannot lower
        packed weights: it packs its own). Running out of memory is one sentence with the
        numbers and what to try."""
        advice = "try --quantize int8 or int4, or a smaller model"
        decode_kernel = "torch"
        try:
            gpt = build_model(info.config, checkpoint_dir, dev, dtype, quantize=quantization, stored=stored)
            if not compile and dev.type == "cpu" and native_library() is not None:
                if dtype == torch.bfloat16 and not cpu_has_native_bf16():
                    widen_bf16_linears(gpt)  # prefill in fp32: torch emulates bf16 matmuls here
                if attach_fused_decode(gpt) is None:
                    decode_kernel = f"native {native_library().isa}"
            if decode_kernel == "torch" and can_pack(dev, dtype) and not compile:
                # The packed copies are new memory; the mapped pages they replace go back.
                linears = sum(m.weight.numel() for m in gpt.modules() if type(m) is torch.nn.Linear)
                check_memory(linears * dtype.itemsize, f"Packing {checkpoint_dir.name}'s weights", advice)
                pack_linears(gpt, page_release(checkpoint_dir))
        except (RuntimeError, MemoryError, OSError) as err:
            if not is_out_of_memory(err):
                raise
            raise OutOfMemoryError(
                f"Out of memory loading {checkpoint_dir.name} ({human_bytes(info.config.num_parameters() * dtype.itemsize)} "
                f"of weights in {prec}; {human_bytes(memory_available())} available); {advice}."
            ) from err
        return gpt, decode_kernel

    @staticmethod
    def _load_part(request: LoadRequest) -> tuple[GPT, World, Ranks]:
        """Start or join the world, have every rank load its part, and make sure all did.
        A torchrun rank other than 0 serves rank 0 from here and never returns."""
        from parrot_cli.distributed import launch, runtime

        world = launch.start(request.layout)
        if not world.leader:
            raise SystemExit(runtime.follow(world))
        ranks = runtime.Ranks(world, runtime.sampler_rank(request.layout))
        atexit.register(ranks.close)  # tell the others to leave, if the caller never closes
        try:
            ranks.call("load", request)
            failure: BaseException | None = None
            try:
                gpt = runtime.build_part(request, world)
            except (ParrotError, MemoryError, torch.OutOfMemoryError) as err:
                failure = err
            ranks.agree(None if failure is None else f"rank 0: {failure}")
            if failure is not None:
                raise failure
        except BaseException:
            ranks.close()
            raise
        return gpt, world, ranks

    @classmethod
    def follower(cls, request: LoadRequest, world: World, ranks: Ranks) -> LLM:
        """A rank other than 0: its part of the model behind the LLM methods rank 0 calls."""
        from parrot_cli.checkpoint.store import read_info
        from parrot_cli.distributed.runtime import build_part

        directory = Path(request.checkpoint_dir)
        config = read_info(directory).config
        gpt = build_part(request, world)
        llm = cls(gpt, None, config, directory, Settings(config={}), world.device, request.precision,
                  request.fixed_max_seq_length)
        llm.layout, llm.ranks = request.layout, ranks
        return llm

    def close(self) -> None:
        """End the other ranks of a multi-device model (they also end when this process
        exits); nothing to do on one device."""
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _everywhere(self, method: str, *args: Any) -> Any:
        """Run LLM.`method`(*args) on every rank: rank 0 tells the others, then runs it too.
        A generation left unfinished (a stream never read to its end) is closed first: the
        other ranks wait inside it, and must hear that it ended before the next command."""
        if self.ranks is not None and self.ranks.leader:
            if self._generation is not None:
                self._generation.close()
            self.ranks.call(method, *args)
        return getattr(self, method)(*args)

    def _compile(self) -> None:
        # Compiling each block keeps the data-dependent cache length outside the graphs.
        for block in self.model.transformer.h:
            block.compile(dynamic=True)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise CheckpointError(
                f"{self.checkpoint_dir} has no tokenizer.json: it can compute logits of token "
                "ids but cannot encode or decode text."
            )
        return self._tokenizer

    @property
    def eos_ids(self) -> list[int]:
        ids = list(self.tokenizer.eos_ids)
        ids += [i for i in self.config.eos_token_id if i not in ids]
        return ids

    # ------------------------------------------------------------------ cache

    @property
    def cache_dtype(self) -> torch.dtype:
        """float32 on CPU: there the decode attention's small bf16 matmuls are slow (an fp32
        cache measured ~9% faster per SmolLM2 token in bf16); the working dtype elsewhere."""
        return torch.float32 if self.device.type == "cpu" else precision_dtype(self.precision)

    def cache_bytes(self, length: int) -> int:
        c = self.config
        itemsize = torch.empty(0, dtype=self.cache_dtype).element_size()
        return 2 * c.n_layer * c.n_query_groups * c.head_size * length * itemsize

    def ensure_cache(self, needed: int) -> int:
        """Make sure the KV cache holds `needed` positions; allocate once and reuse. Returns
        the cache length."""
        limit = self.context_limit
        if needed > limit:
            raise ContextLengthError(f"{needed} tokens do not fit the KV cache of {limit}.")
        if self.model.cache_length >= needed:
            return self.model.cache_length
        # Round up so that a slightly longer next prompt does not reallocate.
        length = self.fixed_max_seq_length or min(limit, max(256, 1 << math.ceil(math.log2(needed))))
        size = self.cache_bytes(length)
        if self.device.type == "cpu":
            # The old cache stays alive while its contents are copied over; the RoPE table
            # (cos and sin, float32, for every position) comes with it.
            rope = 2 * length * self.config.rope_n_elem * 4
            check_memory(size + rope, f"A KV cache of {length} tokens", "lower --max-seq-length")
        if size >= CACHE_NOTICE_BYTES:
            self.notify(f"Allocating a {size / 1024**3:.1f} GiB KV cache for {length} tokens.")
        self._everywhere("_allocate_cache", length)
        return length

    def _allocate_cache(self, length: int) -> None:
        """This rank's KV cache (its layers, its kv heads) for `length` positions."""
        old = [block.attn.kv_cache for block in self.model.transformer.h]
        self.model.clear_caches()
        error = None
        try:
            self.model.setup_caches(1, length, device=self.device, dtype=self.cache_dtype)
            # Growing keeps what the cache held, so a conversation continues across it.
            for block, previous in zip(self.model.transformer.h, old, strict=True):
                if previous is not None:
                    kept = previous.k.size(2)
                    block.attn.kv_cache.k[:, :, :kept] = previous.k
                    block.attn.kv_cache.v[:, :, :kept] = previous.v
        except (RuntimeError, MemoryError) as err:
            if not is_out_of_memory(err):
                raise
            self.model.clear_caches()
            error = OutOfMemoryError(
                f"Out of memory allocating a KV cache of {length} tokens "
                f"({self.cache_bytes(length) / 1024**3:.1f} GiB); lower --max-seq-length."
            )
            error.__cause__ = err
        if self.ranks is not None:
            self.ranks.agree(None if error is None else f"rank {self.ranks.rank}: {error}")
        if error is not None:
            raise error

    # ------------------------------------------------------------------ text

    def sampling(self, **overrides: Any) -> tuple[SamplingParams, int, int | None]:
        """(params, max_new_tokens, seed) from per-call values over resolved settings."""
        s = self.settings.with_flags(**overrides)
        params = SamplingParams(
            temperature=s.get("temperature"),
            top_k=s.get("top_k"),
            top_p=s.get("top_p"),
            min_p=s.get("min_p"),
            repetition_penalty=s.get("repetition_penalty"),
        )
        max_new = s.get("max_new_tokens")
        finite = math.isfinite
        for name, ok, rule in (
            ("temperature", finite(params.temperature) and params.temperature >= 0, "a number >= 0"),
            ("top_p", finite(params.top_p) and 0 < params.top_p <= 1, "in (0, 1]"),
            ("min_p", finite(params.min_p) and 0 <= params.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", finite(params.repetition_penalty) and params.repetition_penalty > 0, "a number > 0"),
            ("top_k", params.top_k is None or params.top_k >= 0, "0 (no limit) or more"),
            ("max_new_tokens", max_new >= 1, "at least 1"),
        ):
            if not ok:
                if s.source(name) == "checkpoint":  # not the user's typo: the checkpoint's file
                    raise CheckpointError(
                        f"The checkpoint's generation_config.json sets {name} = {s.get(name)!r}; it must be {rule}."
                    )
                raise UsageError(f"{name.replace('_', '-')} must be {rule}, not {s.get(name)!r}.")
        return params, max_new, s.get("seed")

    def chat_style(self, prompt_style: str | None = None) -> PromptStyle:
        """How this checkpoint formats a conversation: `prompt_style` if named, else its chat
        template, else the built-in style its name or vocabulary points to."""
        from parrot_cli.prompt_styles import select_style

        names = (self.config.name, self.checkpoint_dir.name)
        return select_style(self.tokenizer, names=names, override=prompt_style)

    def encode_prompt(
        self, prompt: Prompt, system: str | None = None, prompt_style: str | None = None
    ) -> list[int]:
        if isinstance(prompt, str) and system is None and prompt_style is None:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return self.chat_style(prompt_style).encode(self.tokenizer, messages, system=system)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: list[str] | str | None = None,
        system: str | None = None,
        prompt_style: str | None = None,
    ) -> TextStream:
        """Yield text pieces as they are generated. `prompt` is raw text to continue, or a
        list of chat messages (then the chat template or a built-in prompt style, with its
        stop sequences, applies; so does a `system` text)."""
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not isinstance(prompt, str) or system is not None or prompt_style is not None:
            stop += self.chat_style(prompt_style).stop
        return self.stream_ids(
            self.encode_prompt(prompt, system, prompt_style),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )

    def stream_ids(
        self,
        ids: list[int],
        *,
        start_pos: int = 0,
        history: list[int] | None = None,
        stop: list[str] | str | None = None,
        **sampling: Any,
    ) -> TextStream:
        """The streaming core under `stream`, for callers that manage the KV cache: `ids`
        are new tokens prefilled at `start_pos`; positions [0, start_pos) of the cache must
        already hold `history` (a chat keeps earlier turns there and prefills only the
        new ones). Sampling keywords as in `stream`."""
        params, max_new, seed = self.sampling(**sampling)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        result = GenerationResult(prompt_tokens=len(ids))
        run = self._run(ids, params, max_new, seed, stops, result, start_pos, history)
        return TextStream(run, result)

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The whole reply as one string (the same pieces `stream` yields, joined)."""
        return "".join(self.stream(prompt, **kwargs))

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        """Reply to a conversation, formatted with the model's chat template."""
        return self.generate(list(messages), **kwargs)

    @property
    def context_limit(self) -> int:
        """Positions available: the fixed KV cache size, else the model's context."""
        return self.fixed_max_seq_length or self.config.block_size

    def check_context(self, prompt_tokens: int) -> int:
        """Room left for new tokens after a prompt; a prompt that leaves none is an error."""
        limit = self.context_limit
        if prompt_tokens >= limit:
            what = "KV cache (--max-seq-length)" if self.fixed_max_seq_length else "context window"
            raise ContextLengthError(
                f"The prompt is {prompt_tokens} tokens but the model's {what} is {limit} tokens; "
                "shorten the prompt."
            )
        return limit - prompt_tokens

    def _run(
        self,
        ids: list[int],
        params: SamplingParams,
        max_new: int,
        seed: int | None,
        stops: list[str],
        result: GenerationResult,
        start_pos: int = 0,
        history: list[int] | None = None,
    ) -> Iterator[str]:
        room = self.check_context(start_pos + len(ids))
        max_new = min(max_new, room)
        self.ensure_cache(start_pos + len(ids) + max_new)
        decoder = IncrementalDecoder(self.tokenizer)
        # A stop string that is a special token never shows in the decoded text: stop on its id.
        stop_ids = [
            i for s in stops if (i := self.tokenizer.token_to_id(s)) is not None and self.tokenizer.is_special(i)
        ]
        stopper = StopMatcher(stops)
        model_eos = self.eos_ids
        eos = model_eos + stop_ids
        start = time.perf_counter()
        pieces: list[str] = []
        with torch.inference_mode():
            tokens = self.tokens(ids, max_new_tokens=max_new, params=params, eos_ids=eos, seed=seed,
                                 start_pos=start_pos, history=history)
            for token in tokens:
                if not result.generated_tokens:
                    result.time_to_first_token = time.perf_counter() - start
                result.generated_tokens += 1
                result.token_ids.append(token)
                if token in eos:
                    result.finish_reason = "eos" if token in model_eos else "stop"
                    break
                text, stopped = stopper.push(decoder.push(token))
                if text:
                    pieces.append(text)
                    yield text
                if stopped:
                    result.finish_reason = "stop"
                    break
            else:
                result.finish_reason = "length"
            if result.finish_reason != "stop":
                # Generation can end inside a multi-byte character (the length limit cut
                # it): those bytes decode to U+FFFD, which is not text the model wrote.
                text, stopped = stopper.push(decoder.flush().rstrip("\ufffd"))
                tail = text if stopped else text + stopper.flush()
                if stopped:
                    result.finish_reason = "stop"
                if tail:
                    pieces.append(tail)
                    yield tail
        result.seconds = time.perf_counter() - start
        result.text = "".join(pieces)

    def tokens(
        self,
        ids: list[int],
        *,
        max_new_tokens: int,
        params: SamplingParams,
        eos_ids: list[int] | tuple[int, ...] = (),
        seed: int | None = None,
        start_pos: int = 0,
        history: list[int] | None = None,
    ) -> Iterator[int]:
        """The token ids `generation.generate_tokens` samples after `ids` (prefilled at
        `start_pos`; the KV cache must be large enough, see `ensure_cache`), on every rank
        of a multi-device model. Run it under `torch.inference_mode()`."""
        if not params.greedy and seed is None:
            seed = torch.seed()  # rank 0 draws it; a pipeline's last rank samples with it
        spec = {"ids": list(ids), "max_new_tokens": max_new_tokens, "params": params,
                "eos_ids": list(eos_ids), "seed": seed, "start_pos": start_pos,
                "history": list(history or [])}
        tokens = self._everywhere("_tokens_here", spec)
        self._generation = tokens
        try:
            yield from tokens
        finally:
            if self._generation is tokens:
                self._generation = None

    def _tokens_here(self, spec: dict[str, Any]) -> Iterator[int]:
        generator = None
        if not spec["params"].greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(spec["seed"])
        return generate_tokens(
            self.model,
            spec["ids"],
            max_new_tokens=spec["max_new_tokens"],
            params=spec["params"],
            eos_ids=spec["eos_ids"],
            generator=generator,
            start_pos=spec["start_pos"],
            history=spec["history"],
            device=self.device,
            lockstep=self.ranks or ALONE,
        )

    # ------------------------------------------------------------------ scoring

    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] from one full forward (no cache). Positions past
        the context window are computed as the architecture defines them (no error), so
        rope scaling can be checked there."""
        if not ids:
            raise UsageError("logits() needs at least one token id.")
        return self._everywhere("_logits_here", list(ids))

    def _logits_here(self, ids: list[int]) -> torch.Tensor | None:
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        with torch.inference_mode():
            if self.ranks is None:
                return self.model(idx)[0].float()
            with self.ranks.step():
                out = self.model(idx)
                out = None if out is None else out[0].float()
                return self.ranks.to_leader(out, (len(ids), self.config.vocab_size), torch.float32)

    def perplexity(self, text: str) -> float:
        """exp(mean next-token negative log-likelihood) of the text, in context-sized windows."""
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise UsageError("perplexity() needs a text of at least two tokens.")
        window = self.config.block_size
        total, count = 0.0, 0
        for begin in range(0, len(ids) - 1, window):
            chunk = ids[begin : begin + window + 1]
            logits = self.logits(chunk[:-1])
            target = torch.tensor(chunk[1:], device=logits.device)
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(chunk) - 1
        return math.exp(total / count)

    def weight_bytes(self) -> int:
        """Bytes the weights of this rank occupy: parameters (shared ones once; an FSDP
        shard counts its own part) plus the weights of modules that keep them outside
        parameters (packed or quantized; they say `nbytes`), and the int8 mirror of a float
        head that the fused decode step reads."""
        fused = attached_decoder(self.model)
        seen, total = set(), fused.mirror_bytes() if fused else 0
        for module in self.model.modules():
            nbytes = getattr(module, "nbytes", None)
            if isinstance(nbytes, int):
                total += nbytes
            for p in module.parameters(recurse=False):
                local = p.to_local() if hasattr(p, "to_local") else p
                if local.device.type != "meta" and local.data_ptr() not in seen:
                    seen.add(local.data_ptr())
                    total += local.numel() * local.element_size()
        return total

    def memory_by_rank(self) -> list[dict[str, int]]:
        """Peak memory and weight bytes of every rank, rank 0 first (one entry on one device)."""
        return self._everywhere("_memory_here")

    def _memory_here(self) -> list[dict[str, int]]:
        mine = {"rank": self.ranks.rank if self.ranks else 0,
                "peak_memory_bytes": peak_memory_bytes(self.device), "weight_bytes": self.weight_bytes()}
        return self.ranks.gather(mine) if self.ranks is not None else [mine]
