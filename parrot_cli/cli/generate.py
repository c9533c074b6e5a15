"""`parrot generate PROMPT`: continue a prompt (or answer it with --chat), streamed."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from parrot_cli.cli.common import (
    SAMPLING_PANEL,
    ModelOptions,
    SamplingOptions,
    console,
    load_llm,
    memory_line,
    utf8_stdout,
)
from parrot_cli.cli.options import shared
from parrot_cli.errors import UsageError


@shared()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue; '-' reads it from stdin.")],
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[
        str | None, typer.Option(help="System message (implies --chat).")
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="Stop when this text appears (repeatable); it is not printed.", rich_help_panel=SAMPLING_PANEL),
    ] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Generate this many samples.", rich_help_panel=SAMPLING_PANEL)] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per sample instead of streaming text.")
    ] = False,
    *,
    load: ModelOptions,
    sampling: SamplingOptions,
) -> None:
    """Generate text from a prompt, streamed to stdout; stats go to stderr."""
    from parrot_cli.distributed.layout import is_secondary_rank

    # Under torchrun every rank runs this command; only rank 0 reads stdin.
    text = sys.stdin.read() if prompt == "-" and not is_secondary_rank() else prompt
    if not text:
        raise UsageError("The prompt is empty.")
    llm = load_llm(**load.load_kwargs())
    as_chat = chat or system is not None
    request = [{"role": "user", "content": text}] if as_chat else text
    out = utf8_stdout()
    seed = sampling.seed
    for i in range(num_samples):
        stream = llm.stream(
            request,
            **{**sampling.values(), "seed": None if seed is None else seed + i},
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
    console.print(
        f"[dim]Time for inference {sample}: {result.seconds:.02f} sec total, "
        f"{result.tokens_per_second:.02f} tokens/sec, {result.generated_tokens} tokens "
        f"(first token after {result.time_to_first_token:.02f} sec, prompt {result.prompt_tokens} tokens)\n"
        f"Memory used: {memory_line(llm)}[/]",
        soft_wrap=True,
    )
