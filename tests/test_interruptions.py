"""Interruptions and full disks lose nothing: every command that writes a checkpoint is killed
(SIGKILL) and interrupted (SIGINT, what Ctrl-C sends) at seeded random points of its work,
and run out of disk space before and while it writes.

After each interruption the target is the old checkpoint, a new whole one, or nothing:
never a checkpoint that looks whole and is not (every file it lists is there with its
recorded sha256, its config reads, its safetensors headers validate), and `parrot list` sees
no half-written directory. The next run completes. A full disk is one sentence with the
numbers (how much is needed, how much is free), and nothing half-written is left behind.

The commands are one table (`COMMANDS`): a new command that writes a checkpoint is one more
entry. Disk-full runs use a small tmpfs when this process may mount one (root), else
RLIMIT_FSIZE (then the up-front space check cannot be shown; the mid-write failure is).
`PARROT_KILL_SEED` changes the seed; the points tried are printed (pytest -s) and
asserted to have hit the work, not only its start or end.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import pytest

from parrot_cli.checkpoint.info import read_info, read_safetensors_header, sha256_file, weight_files
from parrot_cli.checkpoint.store import _write_safetensors
from parrot_cli.cli.manage import find_checkpoints
from tests.hub_server import HubServer, Repo
from tests.test_gguf import TinySpec, write_tiny_gguf
from tests.test_hardening import hf_llama_weights

SEED = int(os.environ.get("PARROT_KILL_SEED", "14"))
KILL_POINTS = 3  # per command and run: SIGKILL, SIGINT, then one of either from an empty target

MEDIUM_LLAMA = {"model_type": "llama", "vocab_size": 16384, "hidden_size": 128, "intermediate_size": 384,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "eos_token_id": 2, "bos_token_id": 1}  # ~20 MB of float32 weights


# ------------------------------------------------------------------ what "whole" means


def assert_whole(target: Path) -> None:
    """A checkpoint every reader accepts: all listed files, with their recorded checksums."""
    recorded = json.loads((target / "parrot_config.json").read_text())["provenance"]["files"]
    present = {p.name for p in target.iterdir()} - {"parrot_config.json"}
    assert present == set(recorded), (present, set(recorded))
    for name, digest in recorded.items():
        assert sha256_file(target / name) == digest, f"{target / name} is not what was recorded"
    read_info(target)
    for path in weight_files(target):
        read_safetensors_header(path)


def assert_old_new_or_nothing(target: Path, root: Path) -> None:
    if target.exists():
        assert_whole(target)
    # Leftovers of a killed run (NAME.partial, NAME.old) are never listed as checkpoints.
    assert find_checkpoints(root) in ([], [target]), find_checkpoints(root)


# ------------------------------------------------------------------ the commands


@dataclass
class Case:
    """One command that writes a checkpoint, ready to run against its inputs."""

    argv: list[str]
    target: Path
    root: Path  # where `parrot list` looks
    env: dict[str, str] = field(default_factory=dict)
    # True once the command is past its startup and doing its work (writing, fetching).
    started: Callable[[], bool] = lambda: False
    # Extra invariants after an interruption (e.g. the download cache holds no bad file).
    check_leftovers: Callable[[], None] = lambda: None
    # Where the bytes go, for the disk-full runs (the target's filesystem, the download cache).
    writes_under: list[Path] = field(default_factory=list)
    # Bytes held at the peak besides what is left at the end (a download before its cleanup).
    transient_bytes: int = 0


def _partial_of(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def convert_hf(work: Path, inputs: dict) -> Case:
    root = work / "out"
    target = root / "hf-medium"
    return Case(["convert", str(inputs["hf"]), "--output", str(target)], target, root,
                started=lambda: _partial_of(target).exists(), writes_under=[root])


def convert_gguf(work: Path, inputs: dict) -> Case:
    root = work / "out"
    target = root / "gguf-medium"
    return Case(["convert", str(inputs["gguf"]), "--output", str(target)], target, root,
                started=lambda: _partial_of(target).exists(), writes_under=[root])


REPO = "parrot-tests/medium-llama"


def download_hub(work: Path, inputs: dict) -> Case:
    hub: HubServer = inputs["hub"]
    home, cache = work / "home", work / "cache"
    root = home / "checkpoints"
    target = root / REPO
    repo = hub.repos[REPO]
    folder = cache / "hub" / REPO / repo.commit

    def leftovers_ok() -> None:
        # A file under its final name in the download cache is complete and verified.
        if folder.exists():
            for path in folder.iterdir():
                if path.is_file():
                    assert path.read_bytes() == repo.files[path.name], f"{path} is not the hub's file"

    env = {"HF_ENDPOINT": hub.url, "PARROT_HOME": str(home), "PARROT_CACHE": str(cache),
           "HF_HOME": str(work / "hf"), "HF_HUB_DOWNLOAD_TIMEOUT": "5", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_TOKEN": "", "HF_HUB_OFFLINE": ""}
    return Case(["download", REPO, "--force"], target, root, env=env,
                started=lambda: (folder / ".partial").exists() or _partial_of(target).exists(),
                check_leftovers=leftovers_ok, writes_under=[root, cache],
                transient_bytes=sum(len(b) for b in repo.files.values()))


def quantize_int4(work: Path, inputs: dict) -> Case:
    root = work / "out"
    target = root / "hf-medium-int4"
    return Case(["quantize", "int4", "--checkpoint-dir", str(inputs["float"]), "--output", str(target)],
                target, root, started=lambda: _partial_of(target).exists(), writes_under=[root])


# The table: every command that writes a checkpoint (`quantize int4` stands for the
# quantize methods: int8 and gptq share its writer and its cleanup).
COMMANDS: dict[str, Callable[[Path, dict], Case]] = {
    "convert (HF safetensors)": convert_hf,
    "convert (GGUF)": convert_gguf,
    "download (hub)": download_hub,
    "quantize int4": quantize_int4,
}


# ------------------------------------------------------------------ running them


def _child_setup(fsize: int | None = None) -> Callable[[], None]:
    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a background shell job inherits SIG_IGN
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return setup


def spawn(case: Case, fsize: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "parrot_cli", *case.argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **case.env},
                            preexec_fn=_child_setup(fsize))


def run(case: Case, fsize: int | None = None) -> tuple[int, str, float]:
    """Run to the end: (exit code, stderr, seconds from `started` to exit)."""
    proc = spawn(case, fsize)
    began = None
    while proc.poll() is None:
        if began is None and case.started():
            began = time.monotonic()
        time.sleep(0.01)
    _, err = proc.communicate()
    return proc.returncode, err, time.monotonic() - (began or time.monotonic())


def interrupt(case: Case, sig: int, delay: float) -> tuple[int, str, bool]:
    """Start the command, wait until it works, `delay` seconds more, then send `sig`.
    Returns (exit code, stderr, whether the signal hit a running command)."""
    proc = spawn(case)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not case.started() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    hit = proc.poll() is None
    if hit:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, hit


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory):
    """The commands' inputs, built once: a Hugging Face directory, a GGUF file (Q8_0, so the
    conversion dequantizes) and a hub serving the same Llama at 16 MB/s (a kill lands
    mid-transfer)."""
    hf = tmp_path_factory.mktemp("inputs") / "hf-medium"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(MEDIUM_LLAMA))
    _write_safetensors(hf / "model.safetensors", hf_llama_weights(MEDIUM_LLAMA))
    gguf_path = hf.parent / "medium.gguf"
    write_tiny_gguf(gguf_path, TinySpec(hidden=384, n_heads=6, n_kv_heads=3, ffn=1024, n_layers=4,
                                        weight_type=gguf.GGMLQuantizationType.Q8_0))
    server = HubServer(repos={REPO: Repo.from_dir(hf)}, rate=16 * 1024**2).start()
    from parrot_cli.checkpoint.convert import convert

    float_ckpt = convert(hf, hf.parent / "float-medium", dtype="float32")
    yield {"hf": hf, "gguf": gguf_path, "hub": server, "float": float_ckpt}
    server.stop()


@pytest.fixture(scope="module")
def calibration() -> dict[str, tuple[float, int]]:
    """command -> (seconds of work, bytes on disk at the peak) of a complete run."""
    return {}


def calibrate(command: str, case: Case, calibration: dict) -> tuple[float, int]:
    code, err, work = run(case)
    assert code == 0, err
    assert_whole(case.target)
    calibration[command] = (work, _needed(case))
    return calibration[command]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_kill_and_ctrl_c_at_random_points_lose_nothing(command: str, fixtures, calibration, tmp_path: Path) -> None:
    case = COMMANDS[command](tmp_path, fixtures)
    rng = random.Random(f"{command}-{SEED}")
    work, _ = calibrate(command, case, calibration)  # the old state, and how long the work takes
    tried = []
    for point in range(KILL_POINTS):
        sig = (signal.SIGKILL, signal.SIGINT, rng.choice([signal.SIGKILL, signal.SIGINT]))[point]
        if point == KILL_POINTS - 1:
            shutil.rmtree(case.target)  # the last point starts from nothing
        delay = rng.uniform(0, work)
        code, err, hit = interrupt(case, sig, delay)
        tried.append(f"{sig.name} at +{delay:.2f}s/{work:.2f}s: exit {code}{'' if hit else ' (had finished)'}")
        assert "Traceback" not in err, err
        if sig == signal.SIGINT:
            # -SIGINT: the signal came as Python was exiting (shells report that as 130 too).
            assert code in (0, 130, -signal.SIGINT), err
            if code == 130:
                assert err.strip().splitlines()[-1] == "Error: Interrupted.", err
        else:
            assert code in (0, -signal.SIGKILL), err
        assert_old_new_or_nothing(case.target, case.root)
        case.check_leftovers()
    print(f"\n{command}: {'; '.join(tried)}")
    assert any("had finished" not in t for t in tried), tried  # at least one hit the work
    code, err, _ = run(case)  # the next run completes
    assert code == 0, err
    assert_whole(case.target)
    assert not _partial_of(case.target).exists()
    case.check_leftovers()


# ------------------------------------------------------------------ full disks


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path("/tmp") / f"parrot-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


class SmallDisk:
    """A tmpfs of a chosen size mounted at `path` (needs root): a disk that really fills up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)

    def resize(self, size: int) -> None:
        for p in self.path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill(self) -> None:
        """Take every free byte (what another program writing to the same disk does)."""
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for block in (1024 * 1024, 4096, 1):
                try:
                    while True:
                        os.write(fd, bytes(block))
                except OSError:
                    pass
        finally:
            os.close(fd)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=False)


def _needed(case: Case) -> int:
    """What a complete run left on disk (measured on a real disk first)."""
    left = sum(p.stat().st_size for d in case.writes_under if d.exists() for p in d.rglob("*") if p.is_file())
    return left + case.transient_bytes


def _half_written(case: Case) -> list[str]:
    """What a failed run must not leave: any file of the checkpoint or of its .partial
    (the download cache's files are checked by `case.check_leftovers`: complete and
    verified under their names, or resumable parts in its .partial folder)."""
    places = (case.target, _partial_of(case.target))
    return sorted(str(p) for place in places if place.exists() for p in place.rglob("*"))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_full_disk_is_one_sentence_and_leaves_nothing_half_written(command: str, fixtures, calibration,
                                                                      tmp_path: Path) -> None:
    real = COMMANDS[command](tmp_path / "real", fixtures)
    work, need = calibration.get(command) or calibrate(command, real, calibration)
    rng = random.Random(f"disk-{command}-{SEED}")
    if not _can_mount():
        # No tmpfs: a file-size limit below the largest file makes its write fail (EFBIG).
        case = COMMANDS[command](tmp_path / "limited", fixtures)
        code, err, _ = run(case, fsize=need // 4)
        _assert_disk_full(code, err, "filled up")
        assert not case.target.exists() and not _partial_of(case.target).exists()
        return
    disk = SmallDisk(tmp_path / "disk")
    try:
        case = COMMANDS[command](disk.path, fixtures)
        # 1. Too small from the start: refused before anything is written, with the numbers.
        disk.resize(need // 2)
        code, err, _ = run(case)
        _assert_disk_full(code, err, "needs", "free")
        assert _half_written(case) == [], disk.files()
        case.check_leftovers()
        # 2. Room enough at the start, then the disk fills while it writes.
        disk.resize(need + need // 2 + 8 * 1024**2)
        # The seeded point lands in the work; where the command finished first (its writing
        # is a short part of it), the next try fills sooner.
        for attempt in range(5):
            proc = spawn(case)
            while proc.poll() is None and not case.started():
                time.sleep(0.005)
            time.sleep(rng.uniform(0, work / 4) / 4**attempt)
            disk.fill()
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                break
            (disk.path / "filler").unlink()  # it had finished: start over from nothing
            shutil.rmtree(case.target)
        # The run failed where the space ran out: mid-write ("filled up"), or at a later
        # step's own space check ("needs"), e.g. a download's conversion.
        outcome = "filled up" if "filled up" in err else "refused by the next check"
        print(f"\n{command}: disk full up front (refused), then filled at a seeded point: {outcome}")
        _assert_disk_full(proc.returncode, err, "free")
        assert _half_written(case) == [], disk.files()
        case.check_leftovers()
        # Space freed: the next run completes (a download resumes from its kept part).
        (disk.path / "filler").unlink()
        code, err, _ = run(case)
        assert code == 0, err
        assert_whole(case.target)
    finally:
        disk.unmount()


def _assert_disk_full(code: int, err: str, *fragments: str) -> None:
    """Exit 1 and one error sentence with the numbers (a download may first have said what
    it fetched)."""
    assert code == 1 and "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert any(unit in errors[0] for unit in (" MB", " GB", " kB", " bytes")), errors[0]


def test_the_harness_table_covers_every_command_that_writes_a_checkpoint() -> None:
    """A new command that writes checkpoints (parrot quantize ...) must join COMMANDS."""
    from parrot_cli.cli import app

    writers = {"convert", "download", "quantize"}
    registered = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    registered &= writers
    covered = {name.split(" ")[0] for name in COMMANDS}
    assert registered <= covered, f"add {sorted(registered - covered)} to COMMANDS"

