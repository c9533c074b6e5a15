"""`parrot generate PROMPT`: continue a prompt (or answer it with --chat), streamed."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from parrot_cli.cli.common import (
    SAMPLING_PANEL,
    CheckpointDir,
    Compile,
    Device,
    GroupSize,
    MaxNewTokens,
    MaxSeqLength,
    MinP,
    ModelName,
    Precision,
    Quantize,
    QuantizeHead,
    RepetitionPenalty,
    Seed,
    Temperature,
    Threads,
    TopK,
    TopP,
    console,
    load_llm,
    model_choice,
    utf8_stdout,
)
from parrot_cli.errors import UsageError


def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue; '-' reads it from stdin.")],
    checkpoint_dir: CheckpointDir = None,
    model: ModelName = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[
        str | None, typer.Option(help="System message (implies --chat).")
    ] = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop when this text appears (repeatable); it is not printed.", rich_help_panel=SAMPLING_PANEL),
    ] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Generate this many samples.", rich_help_panel=SAMPLING_PANEL)] = 1,
    max_seq_length: MaxSeqLength = None,
    precision: Precision = None,
    device: Device = None,
    threads: Threads = None,
    compile: Compile = None,
    quantize: Quantize = None,
    group_size: GroupSize = None,
    quantize_head: QuantizeHead = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per sample instead of streaming text.")
    ] = False,
) -> None:
    """Generate text from a prompt, streamed to stdout; stats go to stderr."""
    text = sys.stdin.read() if prompt == "-" else prompt
    if not text:
        raise UsageError("The prompt is empty.")
    llm = load_llm(
        model=model_choice(checkpoint_dir, model),
        device=device or "auto",
        precision=precision,
        max_seq_length=max_seq_length,
        compile=bool(compile),
        threads=threads,
        quantize=quantize,
        group_size=group_size,
        quantize_head=quantize_head,
    )
    as_chat = chat or system is not None
    request = [{"role": "user", "content": text}] if as_chat else text
    out = utf8_stdout()
    for i in range(num_samples):
        stream = llm.stream(
            request,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=None if seed is None else seed + i,
            stop=stop,
            system=system,
        )
        if as_json:
            for _ in stream:
                pass
            name = llm.config.name or llm.checkpoint_dir.name
            record = {"model": name, "sample": i + 1, **stream.result.to_dict()}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            continue
        for piece in stream:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        _print_stats(llm, stream.result, i + 1)


def _print_stats(llm, result, sample: int) -> None:
    from parrot_cli.api import peak_memory_bytes

    console.print(
        f"[dim]Time for inference {sample}: {result.seconds:.02f} sec total, "
        f"{result.tokens_per_second:.02f} tokens/sec, {result.generated_tokens} tokens "
        f"(first token after {result.time_to_first_token:.02f} sec, prompt {result.prompt_tokens} tokens)\n"
        f"Memory used: {peak_memory_bytes(llm.device) / 1e9:.02f} GB "
        f"(weights {llm.weight_bytes() / 1e9:.02f} GB, {_weights_kind(llm)})[/]",
        soft_wrap=True,
    )


def _weights_kind(llm) -> str:
    """What the weight memory holds: the quantization mode, or the working precision."""
    if llm.stored_quantization is not None:
        return llm.stored_quantization.summary()
    return llm.quantization.describe() if llm.quantization else llm.precision
