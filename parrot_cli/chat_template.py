"""Chat templates are untrusted code: compiled and rendered in a locked-down jinja2 sandbox.

A checkpoint's chat template comes from whoever published it, and a jinja template is a
program. jinja2's immutable sandbox stops it from reaching Python internals (private
attributes, mutating the conversation); this module adds what the sandbox leaves open, so
a hostile or broken template is one `ChatTemplateError`, never a hang or a memory blow-up:

- time: a render stops after RENDER_SECONDS of wall clock (a line tracer on the rendering
  thread checks the clock, so a loop that prints nothing is stopped too);
- memory: the process's resident memory may grow at most RENDER_MEMORY_BYTES while a
  template renders (checked by the same tracer; the current resident size, not the peak,
  so a process whose peak is already high, after a big load, is held to the same
  allowance), and the rendered prompt holds at most MAX_PROMPT_CHARS characters;
- sizes: operators and calls that multiply a size in one step (`'x' * n`, `n ** m`,
  `'%999999d' % x`, `'{:>999999}'.format(x)`, `center`/`indent`/`wordwrap`... with a huge
  width) refuse sizes above MAX_SIZE; `lipsum` is not available.

Nothing here imports torch (the CLI's fast paths render templates).
"""

from __future__ import annotations

import functools
import json
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from parrot_cli.errors import ParrotError

RENDER_SECONDS = 10.0
RENDER_MEMORY_BYTES = 512 * 1024**2
MAX_PROMPT_CHARS = 16 * 1024**2
MAX_SIZE = 1_000_000  # largest width, repeat count or length one operation may ask for
_TRACE_EVERY = 64  # line events between clock and memory checks
_PAGE_SIZE = resource.getpagesize()

# A width or precision in a %-format or str.format spec ("%999999d", "{:>999999}").
_FORMAT_WIDTH = re.compile(r"(\d{7,})|\*")


class ChatTemplateError(ParrotError):
    """The checkpoint's chat template is missing, broken, or refused the conversation."""


class _TemplateRaised(TemplateError):
    """Raised by a template's own `raise_exception(...)`: the message is meant for the user."""


class _LimitExceeded(TemplateError):
    """A render went past one of this module's limits."""


def _check_size(n: Any, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_SIZE:
        raise _LimitExceeded(f"{what} of {n} (the limit is {MAX_SIZE})")


def _check_format(spec: Any) -> None:
    if isinstance(spec, str) and _FORMAT_WIDTH.search(spec):
        raise _LimitExceeded(f"a format width or precision above {MAX_SIZE} in {spec[:40]!r}")


def _check_join(separator: Any, items: Any) -> None:
    """A join's size is known before it allocates (for a list of strings): bound it."""
    if isinstance(items, list | tuple):
        total = len(str(separator)) * max(len(items) - 1, 0) + sum(len(i) if isinstance(i, str) else 0 for i in items)
        _check_size(total, "a joined string")


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        _check_size(len(text) + (text.count(old) if old else len(text) + 1) * len(new), "a replaced string")


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable jinja2 sandbox, but an unsafe attribute access fails right away, and
    operators and calls that could allocate a huge value in one step are bounded.

    Stock jinja2 returns an Undefined for `''.__class__` (it only fails once something calls or
    indexes it), so `{{ ''.__class__ }}` would render as an empty string. A chat template has no
    business touching private attributes, so we fail loudly instead of rendering a silently
    different prompt.
    """

    intercepted_binops = frozenset({"*", "**", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    _check_size(len(seq) * count, "a repeated value")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _check_size(int(right * abs(left).bit_length()), "a power with bits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        # jinja2 swaps `'...'.format` for its sandboxed formatter when the template reads
        # the attribute: the format string is checked there, before any call.
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(owner)
        return super().wrap_str_format(value)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # str.center(10**9), zfill, ljust, expandtabs, '{:>9999999}'.format(): one call,
        # one huge string. No chat template needs a size argument above MAX_SIZE.
        for value in (*args, *kwargs.values()):
            _check_size(value, "an argument")
        name, owner = getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            if name == "join" and args:
                _check_join(owner, args[0])
            elif name == "replace" and len(args) >= 2:
                _check_replace(owner, *args[:2])
        return super().call(__context, __obj, *args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` and render its body unchanged.

    Training-oriented templates mark assistant spans with this tag (transformers uses it for
    assistant-token masks); inference only needs the text, but the tag must still parse.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(
            lineno
        )

    def _passthrough(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: Any) -> None:
    """Template helper: templates call this to reject conversations they cannot format."""
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    """Template helper: templates stamp "Today's date" into system prompts with it."""
    return datetime.now().strftime(str(fmt)[:200])


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """HF's `tojson`: plain json.dumps. jinja2's own filter HTML-escapes `<>&'`, which would put
    `\\u003c` into prompts where the model was trained on `<`."""
    _check_size(indent, "a JSON indent")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _template_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    """`dict(...)` for templates as a plain function, so templates cannot reach the `dict` type
    itself (and its class attributes) through the global."""
    return dict(*args, **kwargs)


def _bounded(filter_: Callable[..., Any]) -> Callable[..., Any]:
    """A built-in filter whose integer arguments (widths, counts) are bounded by MAX_SIZE."""

    def bounded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            _check_size(value, f"a {filter_.__name__} argument")
        strings = [a for a in args if isinstance(a, str)]
        if filter_.__name__ == "do_format" and strings:
            _check_format(strings[0])
        elif filter_.__name__ == "do_replace" and len(strings) >= 3:
            _check_replace(*strings[:3])
        elif filter_.__name__ == "do_join":
            sequences = [a for a in args if isinstance(a, list | tuple)]
            if sequences:
                _check_join(strings[0] if strings else "", sequences[0])
        return filter_(*args, **kwargs)

    return functools.wraps(filter_)(bounded)  # keeps jinja_pass_arg: how jinja calls it


# Built-in filters that take a width, count or length.
_SIZED_FILTERS = ("center", "indent", "wordwrap", "truncate", "batch", "slice", "format", "replace", "join")


def make_environment() -> jinja2.Environment:
    """The sandbox every chat template is compiled in (the helpers Hub templates expect)."""
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationTag],
    )
    for name in _SIZED_FILTERS:
        env.filters[name] = _bounded(env.filters[name])
    env.filters["tojson"] = _tojson
    env.globals.pop("lipsum", None)  # generates n paragraphs: a template needs none
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _template_dict
    return env


def one_line(text: str) -> str:
    """Collapse whitespace so a multi-line jinja message prints as one sentence; the trailing
    period is dropped because callers embed the text in a sentence of their own."""
    return " ".join(str(text).split()).rstrip(".")


def finish(sentence: str) -> str:
    """End a sentence with a period unless the quoted message already ended it."""
    return sentence if sentence.endswith((".", "!", "?")) else sentence + "."


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox; a syntax error is one ChatTemplateError."""
    try:
        return make_environment().from_string(source)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"The chat template has a syntax error on line {exc.lineno}: "
            f"{one_line(exc.message or str(exc))}."
        ) from exc
    except Exception as exc:  # e.g. a Python SyntaxError in jinja's generated code ({% break %} outside a loop)
        raise ChatTemplateError(
            f"The chat template could not be compiled ({type(exc).__name__}: {one_line(str(exc))})."
        ) from exc


@contextmanager
def _limits() -> Iterator[None]:
    """Time and memory limits for code running on this thread (the template's, and the
    filters it calls): a trace function checks them every few line events."""
    deadline = time.monotonic() + RENDER_SECONDS
    memory_limit = _resident_bytes() + RENDER_MEMORY_BYTES
    events = 0

    def check() -> None:
        if time.monotonic() > deadline:
            raise _LimitExceeded(f"rendering took more than {RENDER_SECONDS:.0f} s")
        if _resident_bytes() > memory_limit:
            raise _LimitExceeded(f"rendering used more than {RENDER_MEMORY_BYTES // 1024**2} MB")

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal events
        events += 1
        if events % _TRACE_EVERY == 0:
            check()
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
        check()
    finally:
        sys.settrace(previous)


def _resident_bytes() -> int:
    """Resident memory of the process now, in bytes: /proc/self/statm where there is one
    (Linux); elsewhere the peak (ru_maxrss: KiB on Linux, bytes on macOS), which only
    errs on the side of a later stop."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def render(template: jinja2.Template, context: dict[str, Any]) -> str:
    """Render under the time, memory and size limits; every failure (a template bug, the
    template refusing the conversation, a sandbox violation, a limit) is one
    ChatTemplateError."""
    pieces: list[str] = []
    size = 0
    try:
        with _limits():
            for piece in template.generate(**context):
                size += len(piece)
                if size > MAX_PROMPT_CHARS:
                    raise _LimitExceeded(f"the prompt grew past {MAX_PROMPT_CHARS} characters")
                pieces.append(piece)
    except _TemplateRaised as exc:
        message = " ".join((exc.message or "no reason given").split())
        raise ChatTemplateError(finish(f"The chat template rejected the conversation: {message}")) from exc
    except _LimitExceeded as exc:
        raise ChatTemplateError(f"The chat template was stopped: {one_line(str(exc))}.") from exc
    except SecurityError as exc:
        raise ChatTemplateError(
            f"The chat template tried something the sandbox forbids ({one_line(str(exc))})."
        ) from exc
    except UndefinedError as exc:
        raise ChatTemplateError(f"The chat template used something undefined ({one_line(str(exc))}).") from exc
    except ParrotError:
        raise
    except Exception as exc:  # a template is arbitrary code: any failure is the template's
        raise ChatTemplateError(
            f"The chat template failed to render ({type(exc).__name__}: {one_line(str(exc))})."
        ) from exc
    return "".join(pieces)
