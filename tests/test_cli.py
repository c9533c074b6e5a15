"""The real `parrot` command in child processes: what users type, what they see.

Each subprocess pays torch's import, so these are few and each checks several things."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_parrot
from tests.hf_factory import CASES_BY_ID, build


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_is_instant_and_imports_no_torch():
    code = (
        "import sys, io, contextlib\n"
        "from parrot_cli.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit as e: assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported on the help path'\n"
        "print(buf.getvalue())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "convert" in out.stdout and "generate" in out.stdout
    version = run_parrot("--version")
    assert version.returncode == 0 and version.stdout.startswith("parrot ")


@pytest.mark.smollm2
def test_generate_stdin_json_and_streamed_text_agree(smollm2_checkpoint):
    args = ["generate", "-", "--checkpoint-dir", str(smollm2_checkpoint), "--temperature", "0",
            "--max-new-tokens", "12", "--precision", "32-true"]
    streamed = run_parrot(*args, input="Hello, my name is")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == " Alex, and I'm a professional coach. I've been\n"
    assert "tokens/sec" in streamed.stderr and "Memory used" in streamed.stderr
    as_json = run_parrot(*args, "--json", "--stop", "coach", input="Hello, my name is")
    assert as_json.returncode == 0, as_json.stderr
    record = json.loads(as_json.stdout)
    assert record["text"] == " Alex, and I'm a professional "
    assert record["finish_reason"] == "stop"
    assert record["prompt_tokens"] == 5
    assert {"generated_tokens", "time_to_first_token_s", "seconds", "tokens_per_second"} <= set(record)


@pytest.mark.smollm2
def test_sampling_seed_reproducible_across_processes(smollm2_checkpoint):
    args = ["generate", "In the forest", "-m", str(smollm2_checkpoint), "--temperature", "1.0",
            "--seed", "1234", "--max-new-tokens", "16", "--num-samples", "2", "--json"]
    first, second = run_parrot(*args), run_parrot(*args)
    assert first.returncode == 0, first.stderr
    samples = [json.loads(line)["text"] for line in first.stdout.splitlines()]
    again = [json.loads(line)["text"] for line in second.stdout.splitlines()]
    assert len(samples) == 2 and samples[0] != samples[1]
    assert samples == again


@pytest.mark.smollm2
def test_over_long_prompt_is_one_line_error(smollm2_checkpoint):
    result = run_parrot("generate", "-", "--checkpoint-dir", str(smollm2_checkpoint),
                        input="hello " * 9000)
    assert_one_line_error(result, 1, "8192")


def test_missing_models_name_the_fix(tmp_path):
    empty_home = {"PARROT_HOME": str(tmp_path / "home")}
    default = run_parrot("generate", "Hi", env=empty_home)
    assert_one_line_error(default, 1, "default model", "parrot download")
    path = run_parrot("generate", "Hi", "--checkpoint-dir", str(tmp_path / "nope"), env=empty_home)
    assert_one_line_error(path, 1, "nope")
    both = run_parrot("generate", "Hi", "--checkpoint-dir", "a", "--model", "b")
    assert_one_line_error(both, 2, "not both")


# The four kinds of usage error click reports, and the fragments each line must hold.
USAGE_ERRORS = [
    (("generate", "hi", "--temperature", "hot"), ("Invalid value for '--temperature'", "parrot generate --help")),
    (("generate", "hi", "--bogus"), ("No such option", "--bogus", "parrot generate --help")),
    (("genrate", "hi"), ("No such command 'genrate'", "parrot --help")),
    (("generate",), ("Missing argument", "parrot generate --help")),
]


def test_usage_errors_are_one_line_and_exit_2():
    """The real command, parsed by whichever click the installed typer uses (typer >= 0.26
    vendors its own): bad value, unknown option, unknown command, missing argument."""
    for args, fragments in USAGE_ERRORS:
        assert_one_line_error(run_parrot(*args), 2, *fragments)


def test_usage_errors_from_click_itself(capsys):
    """typer < 0.26 parses with click itself: its errors must read the same (in-process, on
    click's own parser, since the locked typer no longer uses it)."""
    click = pytest.importorskip("click")
    from parrot_cli.cli import click_exceptions, show_click_error

    generate = click.Command("generate", params=[click.Option(["--temperature"], type=float),
                                                 click.Argument(["prompt"])])
    parrot = click.Group("parrot", commands={"generate": generate})
    for args, fragments in USAGE_ERRORS:
        with pytest.raises(click.ClickException) as caught:
            parrot.main(list(args), prog_name="parrot", standalone_mode=False)
        assert isinstance(caught.value, click_exceptions())  # main() catches it
        assert show_click_error(caught.value) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and all(f in lines[0] for f in fragments), lines


def test_convert_bad_sources_are_clear_and_leave_nothing(tmp_path, smollm2_gguf):
    # a truncated GGUF
    truncated = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        truncated.write_bytes(src.read(5_000_000))
    out = tmp_path / "out"
    result = run_parrot("convert", str(truncated), "--output", str(out))
    assert_one_line_error(result, 1, "truncated")
    assert not out.exists() and not (tmp_path / "out.partial").exists()

    # an unknown architecture
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    result = run_parrot("convert", str(odd), "--output", str(out))
    assert_one_line_error(result, 1, "MambaForCausalLM", "GPT-NeoX", "Falcon", "Llama")
    assert not out.exists()


def test_corrupt_safetensors_checkpoint(tmp_path):
    from parrot_cli.checkpoint.convert import convert

    hf_dir = build(CASES_BY_ID["llama-mha"], tmp_path / "hf")
    ckpt = convert(hf_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = run_parrot("generate", "Hi", "--checkpoint-dir", str(ckpt))
    assert_one_line_error(result, 1, "truncated")
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    result = run_parrot("generate", "Hi", "--checkpoint-dir", str(ckpt))
    assert_one_line_error(result, 1, "corrupt")


@pytest.mark.smollm2
def test_interrupted_convert_leaves_old_state(smollm2_gguf, tmp_path):
    """Ctrl-C in the middle of a conversion: exit 130, no target, no partial directory."""
    out = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "parrot_cli", "convert", str(smollm2_gguf), "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    partial = tmp_path / "ckpt.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert partial.exists(), "conversion never started"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not partial.exists()


def test_completion_hooks_answer_without_torch():
    env = {**os.environ, "_PARROT_COMPLETE": "complete_bash", "COMP_WORDS": "parrot gen", "COMP_CWORD": "1"}
    bash = subprocess.run([sys.executable, "-m", "parrot_cli"], env=env, capture_output=True, text=True, timeout=60)
    assert bash.stdout.split() == ["generate"]
    env.update(COMP_WORDS="parrot generate --precision ", COMP_CWORD="3")
    bash = subprocess.run([sys.executable, "-m", "parrot_cli"], env=env, capture_output=True, text=True, timeout=60)
    assert bash.stdout.split() == ["bf16-true", "16-true", "32-true"]
    zsh_env = {**os.environ, "_PARROT_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "parrot generate --model smollm2"}
    zsh = subprocess.run([sys.executable, "-m", "parrot_cli"], env=zsh_env, capture_output=True, text=True, timeout=60)
    assert "smollm2-q4_1" in zsh.stdout
    fish_env = {**os.environ, "_PARROT_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": "parrot c",
                "_TYPER_COMPLETE_FISH_ACTION": "get-args"}
    fish = subprocess.run([sys.executable, "-m", "parrot_cli"], env=fish_env, capture_output=True, text=True, timeout=60)
    assert "convert" in fish.stdout


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shipped_completion_scripts_are_current(shell):
    env = {**os.environ, "_PARROT_COMPLETE": f"source_{shell}"}
    out = subprocess.run([sys.executable, "-m", "parrot_cli"], env=env, capture_output=True, text=True, timeout=60)
    shipped = Path(__file__).parent.parent / "completions" / f"parrot.{shell}"
    assert out.stdout == shipped.read_text(), "run `make completions`"
