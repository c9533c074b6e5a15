"""The one sampling core: prefill, then one token per decode step, from a static KV cache.

`generate_tokens` is a token iterator that `LLM.generate/stream/chat`, the chat REPL and
`parrot bench` all use, so a fix to sampling or stopping lands once. Sampling is a few
small pure functions over float32 logits, in the order the reference applies them:
repetition penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from parrot_cli.kernels.decode import Scores, decoder_for
from parrot_cli.model import GPT


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None  # None or 0 = no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in the context (prompt included):
    positive logits are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (removed tokens get -inf)."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        threshold = p.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> int:
    """Pick the next token id from one row of logits [vocab]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_needed(p: SamplingParams) -> int:
    """How many of the best tokens sampling with `p` reads: 1 for greedy, k for top-k; 0
    when it needs every logit (no top-k, or a repetition penalty that reorders them)."""
    if p.repetition_penalty != 1.0:
        return 0
    if p.greedy:
        return 1
    return p.top_k or 0


def sample_scores(
    scores: Scores, p: SamplingParams, vocab: int, generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> int:
    """`sample` on a fused step's output: all logits, or only the verified best tokens
    (then every other token is below them, so greedy and top-k see exactly what the full
    logits would give them, and draw the same token from the same generator)."""
    if scores.logits is not None:
        return sample(scores.logits, p, generator, seen)
    if p.greedy:
        return scores.best
    logits = torch.full((vocab,), float("-inf"))
    logits[scores.top_ids.long()] = scores.top_values
    return sample(logits, p, generator, seen)


class Lockstep(Protocol):
    """Keeps the ranks of a multi-device model in step through `generate_tokens` (every
    rank runs the same loop; `distributed.runtime.Ranks` implements it)."""

    samples: bool  # whether this rank has the logits and samples

    def step(self) -> contextlib.AbstractContextManager: ...  # one forward on every rank
    def share(self, token: int) -> int: ...  # the sampling rank's token, everywhere
    def proceed(self) -> bool: ...  # rank 0: go on; the others: whether to
    def stop(self) -> None: ...  # rank 0: the others wait for a step that will not come


class Alone:
    """The lockstep of a model in one process: nothing to wait for."""

    samples = True

    def step(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def share(self, token: int) -> int:
        return token

    def proceed(self) -> bool:
        return True

    def stop(self) -> None:
        pass


ALONE = Alone()


def generate_tokens(
    model: GPT,
    prompt: list[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: Iterable[int] = (),
    generator: torch.Generator | None = None,
    start_pos: int = 0,
    history: list[int] | None = None,
    device: torch.device | None = None,
    lockstep: Lockstep = ALONE,
) -> Iterator[int]:
    """Prefill `prompt` at positions [start_pos, start_pos + len(prompt)), then decode.

    Yields each new token id, the EOS id included (then stops). The cache must hold
    start_pos + len(prompt) + max_new_tokens - 1 positions. `history` is the context
    already in the cache (for the repetition penalty); tokens kept in the cache by a
    caller that continues a conversation are not prefilled again. `device` is where the
    ids go (default: the model's); `lockstep` keeps the ranks of a multi-device model in
    step: every rank runs this loop, the one with the logits samples.

    The prefill runs the model's forward; each decode step runs the model's fused step
    when it has one (`kernels/decode.py`: one native call a token; never on a split model),
    else its forward.
    """
    device = device or model.transformer.ln_f.weight.device
    eos = set(eos_ids)
    track = params.repetition_penalty != 1.0
    seen = list(history or []) + list(prompt) if track else []
    fused = decoder_for(model)
    want = top_needed(params)
    vocab = model.config.vocab_size
    # Only parrot's GPT takes `last_only` (a wrapper around it may not), and only a whole
    # model may drop the other positions (a pipeline stage hands all of them on).
    head_kw = {"last_only": True} if isinstance(model, GPT) and lockstep is ALONE else {}
    idx = torch.tensor(prompt, dtype=torch.long, device=device)[None]
    input_pos = torch.arange(start_pos, start_pos + len(prompt), device=device)
    pos = start_pos + len(prompt)  # where the next token goes
    last = prompt[-1]
    waiting = False  # whether the other ranks wait for word to run another step
    try:
        for step in range(max_new_tokens):
            with lockstep.step():
                token = 0
                seen_t = None
                if lockstep.samples and track:
                    seen_t = torch.tensor(sorted(set(seen)), dtype=torch.long, device=device)
                if step == 0 or fused is None:
                    logits = model(idx, input_pos, **head_kw)
                    if lockstep.samples:
                        token = sample(logits[0, -1], params, generator, seen_t)
                else:
                    token = sample_scores(fused.step(last, pos - 1, want), params, vocab, generator, seen_t)
                token = lockstep.share(token)
                done = token in eos or step == max_new_tokens - 1
                waiting = not done
            yield token
            if done or not lockstep.proceed():
                return
            waiting = False
            if track:
                seen.append(token)
            last = token  # the fused step's input
            if fused is None:
                idx = torch.tensor([[token]], dtype=torch.long, device=device)
                input_pos = torch.tensor([pos], device=device)
            pos += 1
    finally:
        if waiting:  # the consumer stopped early (a stop string, Ctrl-C, close())
            lockstep.stop()
