"""A small Hugging Face hub on 127.0.0.1 for tests: a real HTTP server answering the endpoints
that huggingface_hub 2.4 calls (point `HF_ENDPOINT` at `server.url` in the child's env).

- `GET /api/models/ORG/NAME[/revision/REV]` -> repo info: `sha` and `siblings` (with
  `blobId`, and `lfs.sha256` for large files), as with `?blobs=true`;
- `GET /api/models/ORG/NAME/tree/REV?recursive=true` -> the file list;
- `HEAD`/`GET /ORG/NAME/resolve/REV/FILE` -> the bytes, with `ETag` (git blob sha1, or the
  sha256 of an LFS file), `X-Repo-Commit`, `X-Linked-Etag`/`X-Linked-Size` for LFS files,
  `Content-Length`, and `Range: bytes=N-` answered with 206;
- errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as
  the hub's do, since the client maps them to its typed exceptions only by that header.

Switches simulate a bad network: `rate` (file bodies are sent at about this many bytes
per second, so a download can be interrupted at any point), `fail_status` (every request answers it, e.g. 500),
`stall[FILE] = N` (a GET of FILE sends bytes up to offset N, then stops sending until the
server stops), `drop[FILE] = N` (the next GET of FILE is cut off after offset N, once),
`corrupt` (GETs of these files send one flipped byte). `requests` records every request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pth")


@dataclass
class Repo:
    files: dict[str, bytes]
    token: str | None = None  # gated: requests must carry "Authorization: Bearer TOKEN"

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.commit = digest.hexdigest()

    @classmethod
    def from_dir(cls, directory: Path, token: str | None = None) -> Repo:
        return cls({p.relative_to(directory).as_posix(): p.read_bytes()
                    for p in sorted(Path(directory).rglob("*")) if p.is_file()}, token)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def blob_id(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def etag(self, name: str) -> str:
        return self.sha256(name) if self.is_lfs(name) else self.blob_id(name)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: bool


@dataclass
class HubServer:
    repos: dict[str, Repo] = field(default_factory=dict)
    fail_status: int | None = None
    stall: dict[str, int] = field(default_factory=dict)
    drop: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    rate: int | None = None
    requests: list[Request] = field(default_factory=list)

    def start(self) -> HubServer:
        self._released = threading.Event()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def stop(self) -> None:
        self._released.set()
        self._http.shutdown()
        self._http.server_close()

    def file_gets(self, repo: str | None = None) -> list[Request]:
        """The GETs of file contents (not HEADs, not the API) so far."""
        prefix = f"/{repo}/resolve/" if repo else None
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                and (prefix is None or r.path.startswith(prefix))]


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        # ------------------------------------------------------------------ routing

        def _serve(self, *, body: bool) -> None:
            path = unquote(urlparse(self.path).path)
            auth = self.headers.get("Authorization")
            hub.requests.append(Request(self.command, path, self.headers.get("Range"), auth is not None))
            if hub.fail_status:
                return self._error(hub.fail_status, None, "simulated failure")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
                return self._api(m[1], m[2], tree=True)
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
                return self._api(m[1], m[2] or "main", tree=False)
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._file(m[1], m[2], m[3], body=body)
            self._error(404, None, "no such endpoint")

        def _repo(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return None
            if revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return repo

        def _api(self, repo_id: str, revision: str, *, tree: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if tree:
                data: object = [
                    {"type": "file", "path": n, "size": len(b), "oid": repo.blob_id(n),
                     **({"lfs": {"oid": repo.sha256(n), "size": len(b), "pointerSize": 134}}
                        if repo.is_lfs(n) else {})}
                    for n, b in sorted(repo.files.items())
                ]
            else:
                data = {
                    "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                    "gated": "manual" if repo.token else False,
                    "siblings": [
                        {"rfilename": n, "size": len(b), "blobId": repo.blob_id(n),
                         **({"lfs": {"sha256": repo.sha256(n), "size": len(b), "pointerSize": 134}}
                            if repo.is_lfs(n) else {})}
                        for n, b in sorted(repo.files.items())
                    ],
                }
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _file(self, repo_id: str, revision: str, name: str, *, body: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if name not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found")
            data = repo.files[name]
            if body and name in hub.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            start = 0
            if m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
                start = int(m[1])
            self.send_response(206 if start else 200)
            self.send_header("ETag", f'"{repo.etag(name)}"')
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("Accept-Ranges", "bytes")
            if repo.is_lfs(name):
                self.send_header("X-Linked-Etag", f'"{repo.sha256(name)}"')
                self.send_header("X-Linked-Size", str(len(data)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if not body:
                return
            # A stall holds everything past its offset (a resumed request stalls at once);
            # a drop cuts the body once. Either way Content-Length promised more.
            stall_at = hub.stall.get(name)
            drop_at = hub.drop.pop(name, None)
            cut = min(max(x, start) for x in (stall_at, drop_at, len(data)) if x is not None)
            if hub.rate:
                step = max(hub.rate // 20, 1)  # 20 writes a second
                try:
                    for at in range(start, cut, step):
                        self.wfile.write(data[at : min(at + step, cut)])
                        self.wfile.flush()
                        time.sleep(0.05)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed
                    self.close_connection = True
                    return
            else:
                self.wfile.write(data[start:cut])
                self.wfile.flush()
            if cut == len(data):
                return
            if cut != drop_at:
                hub._released.wait()  # stalled: send nothing more until the server stops
            self.close_connection = True

        def _error(self, status: int, code: str | None, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler
