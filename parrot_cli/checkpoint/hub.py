"""Hugging Face hub downloads with the real `huggingface_hub` client, resumable and verified.

Why not `snapshot_download` (see FINDINGS.md, huggingface_hub 2.4): the client checks sizes
only, and after Ctrl-C or a killed process its temporary file (a random per-process name,
deleted on error) is lost, so nothing resumes. Here each file is

1. resolved with `get_hf_file_metadata` (HEAD: size, and an ETag that is the sha256 of an
   LFS file or the git blob sha1 of a small one),
2. appended to our own `DIR/.partial/FILE` with `http_get(..., resume_size=N)`: a rerun
   after any interruption sends `Range: bytes=N-` and keeps the N bytes it has,
3. hashed and compared with the ETag (a mismatch deletes the file and says so),
4. renamed to `DIR/FILE` only then: a file under its final name is complete and verified.

DIR is `$PARROT_CACHE/hub/ORG/NAME/<commit sha>`, so files of different revisions never
mix and the directory name records the revision for the conversion's provenance. Nothing
here imports huggingface_hub (or torch) at module import time; pyproject pins the
huggingface_hub range whose `http_get` / `get_hf_file_metadata` signatures this relies on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import urlparse

from parrot_cli.checkpoint.info import hash_file, sha256_file
from parrot_cli.errors import (  # noqa: F401 (DiskFullError: re-exported, raised here)
    CheckpointError,
    DiskFullError,
    ModelNotFoundError,
    ParrotError,
    UsageError,
)
from parrot_cli.paths import cache_dir
from parrot_cli.resources import disk_free, human_bytes, is_disk_full, mount_of

# The tokenizer files a conversion copies into the checkpoint (convert.py uses this list).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Everything besides the weights that a transformers checkpoint needs to be converted
# (GPTQ repos may keep their settings in quantize_config.json instead of config.json).
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, "quantize_config.json")
# http_get reads the body in chunks of this size and writes (and reports progress) only
# whole chunks: huggingface_hub's 10 MiB default would lose up to 10 MiB on a kill and update
# the progress bar every 10 MiB; 1 MiB keeps both fine-grained at no measurable cost.
CHUNK_BYTES = 1024 * 1024


class HubError(ParrotError):
    """The hub refused or failed a request (the message says what to do)."""


class HubUnreachableError(HubError):
    """No connection to the hub (network down, timed out, or HF_HUB_OFFLINE=1)."""


class HubAccessError(HubError):
    """A gated or private repository refused the request (401/403)."""


class ChecksumMismatchError(CheckpointError):
    """A downloaded file's content does not match the hub's checksum; it was deleted."""


class DownloadProgress(Protocol):
    """What the download reports; the CLI renders it with rich, library callers may ignore it."""

    def file_started(self, name: str, size: int | None, done: int) -> None: ...

    def advanced(self, name: str, n: int) -> None: ...

    def file_done(self, name: str) -> None: ...


class _Silent:
    def file_started(self, name: str, size: int | None, done: int) -> None:
        pass

    def advanced(self, name: str, n: int) -> None:
        pass

    def file_done(self, name: str) -> None:
        pass


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1 (every file)


@dataclass
class Plan:
    """What one `parrot download` of a hub repository fetches, pinned to one commit."""

    repo_id: str
    commit: str
    files: list[RemoteFile]
    gguf: str | None = None  # the one .gguf file, when the repo is imported from GGUF

    @property
    def directory(self) -> Path:
        return cache_dir() / "hub" / self.repo_id / self.commit

    @property
    def label(self) -> str:
        """Provenance "source" of the checkpoint: a rerun at the same commit is up to date."""
        return f"hub:{self.repo_id}@{self.commit}" + (f"/{self.gguf}" if self.gguf else "")

    @property
    def source_path(self) -> Path:
        """What to convert: the .gguf file, or the directory of a transformers checkpoint."""
        return self.directory / self.gguf if self.gguf else self.directory

    def missing(self) -> list[RemoteFile]:
        return [f for f in self.files if not (self.directory / f.name).is_file()]


def parse_repo(text: str) -> tuple[str, str | None]:
    """"ORG/NAME" or "ORG/NAME:QUANT" (GGUF shorthand) -> (repo id, quant or None)."""
    repo, _, quant = text.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (":" in text and not quant):
        raise UsageError(f"{text!r} is not a hub repository id (ORG/NAME or ORG/NAME:QUANT).")
    return repo, quant or None


def select_files(
    names: Sequence[str], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[str]:
    """The files a conversion needs: config, tokenizer, generation config and the weights
    (safetensors when there are any, `.bin` only when nothing else), plus files matching an
    --include glob, minus those matching an --exclude glob."""
    root = {n for n in names if "/" not in n}
    chosen = {n for n in MODEL_FILES if n in root}
    if "model.safetensors.index.json" in root:  # sharded: the index's shards, not extras
        chosen |= {"model.safetensors.index.json"} | set(fnmatch.filter(root, "model-*.safetensors"))
    elif "model.safetensors" in root:
        chosen.add("model.safetensors")
    elif fnmatch.filter(root, "*.safetensors"):
        chosen |= set(fnmatch.filter(root, "*.safetensors"))
    elif fnmatch.filter(root, "pytorch_model*.bin"):
        chosen |= set(fnmatch.filter(root, "pytorch_model*.bin"))
        chosen |= {"pytorch_model.bin.index.json"} & root
    else:
        chosen |= set(fnmatch.filter(root, "*.pth"))
    chosen |= {n for n in names if any(fnmatch.fnmatch(n, g) for g in include)}
    return sorted(n for n in chosen if not any(fnmatch.fnmatch(n, g) for g in exclude))


def pick_gguf(ggufs: Sequence[str], quant: str) -> str:
    """The one .gguf file whose name carries QUANT (Q4_K_M matches NAME-Q4_K_M.gguf)."""
    q = quant.lower()
    exact = [g for g in ggufs if re.search(rf"[-._]{re.escape(q)}\.gguf$", g.lower())]
    matches = exact or [g for g in ggufs if q in g.lower()]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(ggufs) or "none"
    how = "several files match" if matches else "no file matches"
    raise ModelNotFoundError(f"{how} {quant!r}; choose one with --file (GGUF files: {listed}).")


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: sha1 over "blob SIZE\\0" + content (the hub's ETag of small files)."""
    return hash_file(hashlib.sha1(b"blob %d\0" % path.stat().st_size), path).hexdigest()


def verify(path: Path, expected: str, name: str) -> None:
    """Compare with the hub's checksum (64 hex = sha256, 40 hex = git blob sha1); on a
    mismatch delete the file, so the next run fetches it again."""
    actual = sha256_file(path) if len(expected) == 64 else git_blob_sha1(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        kind = "sha256" if len(expected) == 64 else "git blob sha1"
        raise ChecksumMismatchError(
            f"{name} does not match its {kind} checksum on the hub (corrupted in transit); "
            f"the bad file was deleted, run the command again to fetch it anew."
        )


def _expected_checksum(etag: str | None, remote: RemoteFile) -> str:
    for candidate in (etag, remote.sha256, remote.blob_id):
        if candidate and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", candidate):
            return candidate
    raise CheckpointError(f"The hub sent no checksum for {remote.name}, so it cannot be verified.")


class Hub:
    """The hub as parrot uses it. `token=None` lets huggingface_hub use HF_TOKEN or the
    saved login; the token itself never appears in a message."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or None

    # ------------------------------------------------------------------ planning

    def plan(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        file: str | None = None,
        quant: str | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> Plan:
        """Ask the hub for the repository's file list at `revision` and pick what to fetch."""
        from huggingface_hub import HfApi, constants

        self._check_online()
        with self._errors(repo_id, revision=revision):
            info = HfApi(token=self.token).model_info(
                repo_id, revision=revision, files_metadata=True, timeout=constants.HF_HUB_ETAG_TIMEOUT
            )
        if not info.sha:
            raise HubError(f"The hub did not say which commit {repo_id} is at, so it cannot be pinned.")
        remote = {  # names come from the server: none may point outside the download folder
            s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
            for s in info.siblings or []
            if not PurePosixPath(s.rfilename).is_absolute() and ".." not in PurePosixPath(s.rfilename).parts
        }
        ggufs = sorted(n for n in remote if n.endswith(".gguf"))
        if quant is not None:
            file = pick_gguf(ggufs, quant)
        if file is not None:
            if file not in remote:
                listed = f" (GGUF files: {', '.join(ggufs)})" if ggufs else ""
                raise ModelNotFoundError(f"{repo_id} has no file {file}{listed}.")
            return Plan(repo_id, info.sha, [remote[file]], gguf=file if file.endswith(".gguf") else None)
        if "config.json" not in remote:
            if ggufs:
                raise UsageError(
                    f"{repo_id} holds GGUF files, not a transformers checkpoint; pick one with "
                    f"--file {ggufs[0]} (or {repo_id}:QUANT)."
                )
            raise CheckpointError(f"{repo_id} has no config.json, so it is not a model parrot can convert.")
        names = select_files(list(remote), include, exclude)
        return Plan(repo_id, info.sha, [remote[n] for n in names])

    # ------------------------------------------------------------------ fetching

    def download(
        self,
        plan: Plan,
        *,
        progress: DownloadProgress | None = None,
        check_architecture: bool = True,
        reserve: int = 0,
    ) -> Path:
        """Fetch every missing file of `plan` (config.json first: with `check_architecture`,
        an unsupported architecture fails before any weight is transferred). `reserve` is
        space the caller needs afterwards on the same disk (the converted checkpoint): the
        space check counts it too, before anything is fetched."""
        from huggingface_hub import constants

        progress = progress or _Silent()
        plan.directory.mkdir(parents=True, exist_ok=True)
        self._check_space(plan, reserve)
        default_chunk, constants.DOWNLOAD_CHUNK_SIZE = constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES
        try:
            for remote in sorted(plan.files, key=lambda f: (f.name != "config.json", f.size or 0, f.name)):
                try:
                    self._fetch(plan, remote, progress)
                except OSError as err:
                    if not is_disk_full(err):
                        raise
                    raise DiskFullError(
                        f"The disk filled up while downloading {remote.name} of {plan.repo_id}: "
                        f"{human_bytes(self._still_needed(plan) + reserve)} more is needed and "
                        f"{human_bytes(disk_free(plan.directory))} is free; the part already fetched is "
                        "kept, so free some space (or move the cache with PARROT_CACHE) and run the "
                        "command again to resume."
                    ) from err
                if remote.name == "config.json" and check_architecture:
                    from parrot_cli.checkpoint.info import read_json
                    from parrot_cli.config import Config

                    hf_config = read_json(plan.directory / "config.json", required=True)
                    Config.from_hf(hf_config, where=f"{plan.repo_id}'s config.json")
        finally:  # http_get reads the constant at call time; restore it for other users
            constants.DOWNLOAD_CHUNK_SIZE = default_chunk
        shutil.rmtree(plan.directory / ".partial", ignore_errors=True)
        return plan.directory

    def _fetch(self, plan: Plan, remote: RemoteFile, progress: DownloadProgress) -> None:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        final = plan.directory / remote.name
        if final.is_file():
            return
        partial = plan.directory / ".partial" / remote.name
        partial.parent.mkdir(parents=True, exist_ok=True)
        url = hf_hub_url(plan.repo_id, remote.name, revision=plan.commit)
        with self._errors(plan.repo_id, filename=remote.name):
            meta = get_hf_file_metadata(url, token=self.token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        size = meta.size if meta.size is not None else remote.size
        expected = _expected_checksum(meta.etag, remote)
        have = partial.stat().st_size if partial.is_file() else 0
        if size is not None and have > size:  # not a prefix of this file: start over
            partial.unlink()
            have = 0
        progress.file_started(remote.name, size, have)
        # The token goes only to the hub itself, never to a CDN it redirects to.
        same_host = urlparse(meta.location).netloc == urlparse(constants.ENDPOINT).netloc
        headers = build_hf_headers(token=self.token) if same_host else {}
        bar = _bar_class(progress, remote.name)
        with self._errors(plan.repo_id, filename=remote.name, downloading=True):
            with open(partial, "ab") as out:
                if have != size:
                    http_get(meta.location, out, resume_size=have, headers=headers,
                             expected_size=size, displayed_filename=remote.name, tqdm_class=bar)
        verify(partial, expected, remote.name)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        progress.file_done(remote.name)

    @staticmethod
    def _still_needed(plan: Plan) -> int:
        """Bytes of the plan not yet on disk (partial downloads count as far as they got)."""
        need = 0
        for f in plan.missing():
            partial = plan.directory / ".partial" / f.name
            need += max((f.size or 0) - (partial.stat().st_size if partial.is_file() else 0), 0)
        return need

    def _check_space(self, plan: Plan, reserve: int = 0) -> None:
        fetch = self._still_needed(plan)
        free = shutil.disk_usage(plan.directory).free
        if fetch + reserve > free:
            parts = f" ({_gb(fetch)} to fetch, {_gb(reserve)} for the converted checkpoint)" if reserve else ""
            raise DiskFullError(
                f"{plan.repo_id} needs {_gb(fetch + reserve)} more{parts} but {mount_of(plan.directory)} "
                f"has only {_gb(free)} free; free some space or move the cache with PARROT_CACHE."
            )

    # ------------------------------------------------------------------ errors

    def _check_online(self) -> None:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise HubUnreachableError(
                "HF_HUB_OFFLINE=1 is set, so nothing is fetched from the Hugging Face hub; "
                "unset it, or download from a local path or a pip: source."
            )

    def _token_origin(self) -> str | None:
        if self.token:
            return "the token given with --token"
        if os.environ.get("HF_TOKEN"):
            return "the token in HF_TOKEN"
        from huggingface_hub import get_token

        return "your saved `hf auth login` token" if get_token() else None

    def _access_message(self, repo_id: str, status: int) -> str:
        origin = self._token_origin()
        if origin is None:
            return (
                f"{repo_id} is gated or private (the hub answered {status}); accept its terms on "
                f"the hub and pass a token with --token or the HF_TOKEN variable."
            )
        return (
            f"{repo_id} is gated or private and the hub refused {origin} ({status}); make sure "
            f"that account has access, or pass another token with --token or HF_TOKEN."
        )

    @contextmanager
    def _errors(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        filename: str | None = None,
        downloading: bool = False,
    ) -> Iterator[None]:
        """Turn the client's exceptions into one sentence each (never with the token)."""
        import httpx2
        from huggingface_hub import constants, errors

        what = f"{filename} of {repo_id}" if filename else repo_id
        try:
            yield
        except errors.OfflineModeIsEnabled as err:
            raise HubUnreachableError(
                "HF_HUB_OFFLINE=1 is set, so nothing is fetched from the Hugging Face hub; unset it."
            ) from err
        except errors.GatedRepoError as err:
            raise HubAccessError(self._access_message(repo_id, _status(err))) from err
        except errors.RevisionNotFoundError as err:
            raise ModelNotFoundError(f"{repo_id} has no revision {revision!r} on the hub.") from err
        except errors.RemoteEntryNotFoundError as err:
            raise ModelNotFoundError(f"{repo_id} has no file {filename} on the hub.") from err
        except errors.RepositoryNotFoundError as err:
            raise ModelNotFoundError(
                f"No repository {repo_id} on the Hugging Face hub (check the name; a private repo "
                f"needs a token: --token or HF_TOKEN)."
            ) from err
        except errors.HfHubHTTPError as err:
            status = _status(err)
            if status in (401, 403):
                raise HubAccessError(self._access_message(repo_id, status)) from err
            if status == 404:
                raise ModelNotFoundError(f"The hub has no {what} (404).") from err
            raise HubError(
                f"The Hugging Face hub answered {status} for {what}; try again later"
                f"{' (the download resumes where it stopped)' if downloading else ''}."
            ) from err
        except httpx2.TimeoutException as err:
            if downloading:
                raise HubError(
                    f"The download of {what} stalled (no data for {constants.HF_HUB_DOWNLOAD_TIMEOUT} s); "
                    f"run the command again to resume it."
                ) from err
            raise HubUnreachableError(
                f"The Hugging Face hub at {constants.ENDPOINT} did not answer in time; check your "
                f"connection, or set HF_HUB_OFFLINE=1 to use local files only."
            ) from err
        except httpx2.ConnectError as err:
            raise HubUnreachableError(
                f"The Hugging Face hub at {constants.ENDPOINT} is unreachable; check your "
                f"connection, or set HF_HUB_OFFLINE=1 to use local files only."
            ) from err
        except (httpx2.TransportError, httpx2.StreamError) as err:
            raise HubError(
                f"The connection broke while fetching {what}; run the command again to resume."
            ) from err
        except OSError as err:
            if is_disk_full(err):
                raise  # download() says how much space is still needed
            if "Consistency check failed" in str(err):
                raise HubError(
                    f"The hub sent {what} short (connection cut); run the command again to resume."
                ) from err
            raise


def _status(err: Any) -> int:
    response = getattr(err, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _bar_class(progress: DownloadProgress, name: str) -> type:
    """A tqdm stand-in for http_get (it accepts any class): forwards byte counts to `progress`."""

    class _Bar:
        def __init__(self, **_: Any) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *_: Any) -> None:
            return None

        def update(self, n: int) -> None:
            progress.advanced(name, n)

        def close(self) -> None:
            pass

    return _Bar
