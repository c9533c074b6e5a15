"""`LLM`: load a model once, then answer many prompts ("warm, then infer").

The CLI and Python users share this object; the CLI never reaches around it. Text flows
one way: prompt -> tokenizer -> model (+ KV cache) -> sampler -> detokenizer -> stream.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from parrot_cli.checkpoint.info import read_info, read_json
from parrot_cli.checkpoint.load import build_model
from parrot_cli.checkpoint.locate import locate
from parrot_cli.config import Config
from parrot_cli.errors import (
    CheckpointError,
    ContextLengthError,
    NotSupportedError,
    OutOfMemoryError,
    UsageError,
    is_out_of_memory,
)
from parrot_cli.generation import SamplingParams, generate_tokens
from parrot_cli.kernels import can_pack, pack_linears
from parrot_cli.model import GPT
from parrot_cli.quantize import QuantSpec, resolve_mode
from parrot_cli.quantize import plan as plan_quantization
from parrot_cli.quantize.qconfig import QuantizationConfig, read_quantization_config
from parrot_cli.resources import check_memory, human_bytes, memory_available
from parrot_cli.settings import PRECISIONS, Settings
from parrot_cli.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer

if TYPE_CHECKING:
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


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 halves
    the bytes read per token and its matmuls are fast; elsewhere bf16 is emulated and slower
    than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
        # Called with one-line notices (e.g. a large KV cache); the CLI prints them dimmed.
        self.notify: Callable[[str], None] = lambda message: None

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
        devices: int = 1,
        settings: Settings | None = None,
        group_size: int | None = None,
        quantize_head: bool | None = None,
    ) -> LLM:
        """Load a checkpoint directory or known model name (None = the configured default).
        `quantize` names a mode of `parrot_cli.quantize.MODES` (the Linears of every block,
        and the head with `quantize_head`, quantized while loading); `group_size` is int4's."""
        start = time.perf_counter()
        if strategy not in (None, "auto", "single") or devices != 1:
            raise NotSupportedError(
                "Multi-device strategies (--strategy/--devices) are not supported yet; "
                "run on one device."
            )
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
        }
        settings = (settings or Settings()).with_flags(**flags)
        resolve_mode(settings.get("quantize"))  # an unknown mode fails before anything else
        checkpoint_dir = locate(settings.get("model"))
        info = read_info(checkpoint_dir)
        stored = read_quantization_config(checkpoint_dir)
        dev = pick_device(settings.get("device"))
        prec = settings.get("precision") or default_precision(dev)
        dtype = precision_dtype(prec)
        # Every impossible request (bnb missing, wrong device, group size) fails here,
        # before a single weight is read.
        quantization = plan_quantization(
            settings.get("quantize"),
            info.config,
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
        advice = "try --quantize int8 or int4, or a smaller model"
        try:
            gpt = build_model(info.config, checkpoint_dir, dev, dtype, quantize=quantization, stored=stored)
            if can_pack(dev, dtype) and not settings.get("compile"):
                # The packed copies are new memory (the mapped weights they replace are not).
                linears = sum(m.weight.numel() for m in gpt.modules() if type(m) is torch.nn.Linear)
                check_memory(linears * dtype.itemsize, f"Packing {checkpoint_dir.name}'s weights", advice)
                pack_linears(gpt)  # inductor cannot lower packed weights; it packs its own
        except (RuntimeError, MemoryError, OSError) as err:
            if not is_out_of_memory(err):
                raise
            raise OutOfMemoryError(
                f"Out of memory loading {checkpoint_dir.name} ({human_bytes(info.config.num_parameters() * dtype.itemsize)} "
                f"of weights in {prec}; {human_bytes(memory_available())} available); {advice}."
            ) from err
        fixed = settings.get("max_seq_length")
        if fixed is not None and not 0 < fixed <= info.config.block_size:
            raise UsageError(
                f"--max-seq-length {fixed} is outside 1..{info.config.block_size} (the model's context)."
            )
        llm = cls(gpt, tokenizer, info.config, checkpoint_dir, settings, dev, prec, fixed)
        llm.quantization = quantization
        llm.stored_quantization = stored
        if settings.get("compile"):
            llm._compile()
        llm.load_seconds = time.perf_counter() - start
        return llm

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
        old = [block.attn.kv_cache for block in self.model.transformer.h]
        self.model.clear_caches()
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
            raise OutOfMemoryError(
                f"Out of memory allocating a KV cache of {length} tokens ({size / 1024**3:.1f} GiB); "
                "lower --max-seq-length."
            ) from err
        return length

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
        generator = None
        if not params.greedy:
            generator = torch.Generator(self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
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
            tokens = generate_tokens(
                self.model,
                ids,
                max_new_tokens=max_new,
                params=params,
                eos_ids=eos,
                generator=generator,
                start_pos=start_pos,
                history=history,
            )
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

    # ------------------------------------------------------------------ scoring

    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 logits [len(ids), vocab] from one full forward (no cache). Positions past
        the context window are computed as the architecture defines them (no error), so
        rope scaling can be checked there."""
        if not ids:
            raise UsageError("logits() needs at least one token id.")
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)[None]
        with torch.inference_mode():
            return self.model(idx)[0].float()

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
        """Bytes the weights occupy: parameters (shared ones once) plus the weights of
        modules that keep them outside parameters (packed or quantized; they say `nbytes`)."""
        seen, total = set(), 0
        for module in self.model.modules():
            nbytes = getattr(module, "nbytes", None)
            if isinstance(nbytes, int):
                total += nbytes
            for p in module.parameters(recurse=False):
                if p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
        return total
