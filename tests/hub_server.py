"""A Hub-compatible test server on 127.0.0.1, for ``HF_ENDPOINT``.

Serves repos laid out as ``root/<owner>/<repo>/<branch>/<files>`` with the
endpoints huggingface_hub uses to list refs and trees and to download files
(HEAD + ranged GET, LFS etags, the Hub's error codes). ``throttle`` slows
downloads so a test can interrupt one half-way; ``requests`` records what
was asked for.

    python -m tests.hub_server ROOT --port 8123
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_THRESHOLD = 1024


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubState:
    root: Path
    throttle_bytes_per_second: float | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _sha256: dict[Path, str] = field(default_factory=dict)

    def sha256(self, path: Path) -> str:
        key = path.resolve()
        if key not in self._sha256:
            self._sha256[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._sha256[key]


class HubHandler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made by serve()
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _repo(self, owner: str, repo: str) -> Path | None:
        path = self.state.root / owner / repo
        return path if path.is_dir() and ".." not in (owner + repo) else None

    def _branch(self, owner: str, repo: str, revision: str) -> Path | None:
        repo_dir = self._repo(owner, repo)
        if repo_dir is None:
            self._error(404, "RepoNotFound", f"Repository {owner}/{repo} not found")
            return None
        branch = repo_dir / revision
        if "/" in revision or ".." in revision or not branch.is_dir():
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return branch

    @staticmethod
    def _commit(branch: Path) -> str:
        return hashlib.sha1(str(branch).encode()).hexdigest()

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        path = unquote(urlparse(self.path).path)
        with self.state.lock:
            self.state.requests.append((self.command, path, self.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)/refs", path):
            return self._refs(*m.groups())
        if m := re.fullmatch(r"/api/models/([^/]+)/([^/]+)/tree/([^/]+)/?(.*)", path):
            return self._tree(*m.groups())
        if m := re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(*m.groups())
        self._error(404, "NotFound", f"no route for {path}")

    def _refs(self, owner: str, repo: str) -> None:
        repo_dir = self._repo(owner, repo)
        if repo_dir is None:
            return self._error(404, "RepoNotFound", f"Repository {owner}/{repo} not found")
        branches = [
            {"name": b.name, "ref": f"refs/heads/{b.name}", "targetCommit": self._commit(b)}
            for b in sorted(repo_dir.iterdir())
            if b.is_dir()
        ]
        self._json({"branches": branches, "converts": [], "tags": []})

    def _tree(self, owner: str, repo: str, revision: str, sub: str) -> None:
        branch = self._branch(owner, repo, revision)
        if branch is None:
            return
        entries = []
        for f in sorted(branch.rglob("*")):
            rel = f.relative_to(branch).as_posix()
            if f.is_dir():
                entries.append({"type": "directory", "oid": _git_blob_sha1(rel.encode()), "size": 0, "path": rel})
                continue
            size = f.stat().st_size
            entry = {"type": "file", "size": size, "path": rel}
            if size > LFS_THRESHOLD:
                entry["oid"] = _git_blob_sha1(b"pointer " + rel.encode())
                entry["lfs"] = {"oid": self.state.sha256(f), "size": size, "pointerSize": 134}
            else:
                entry["oid"] = _git_blob_sha1(f.read_bytes())
            entries.append(entry)
        self._json(entries)

    def _resolve(self, owner: str, repo: str, revision: str, filename: str) -> None:
        branch = self._branch(owner, repo, revision)
        if branch is None:
            return
        file = branch / filename
        if ".." in filename or not file.is_file():
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
        size = file.stat().st_size
        start = 0
        if rng := self.headers.get("Range"):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            start = int(m.group(1)) if m else 0
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", self._commit(branch))
        if size > LFS_THRESHOLD:
            self.send_header("X-Linked-Etag", f'"{self.state.sha256(file)}"')
            self.send_header("X-Linked-Size", str(size))
            self.send_header("ETag", f'"{self.state.sha256(file)}"')
        else:
            self.send_header("ETag", f'"{_git_blob_sha1(file.read_bytes())}"')
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_file(file, start)

    def _send_file(self, file: Path, start: int) -> None:
        rate = self.state.throttle_bytes_per_second
        chunk = 64 * 1024 if rate is None else max(1024, int(rate / 20))
        with file.open("rb") as f:
            f.seek(start)
            while data := f.read(chunk):
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if rate:
                    time.sleep(len(data) / rate)


class HubServer:
    """A running server; ``url`` is what HF_ENDPOINT should be set to."""

    def __init__(self, root: Path, port: int = 0, throttle: float | None = None):
        self.state = HubState(root=Path(root), throttle_bytes_per_second=throttle)
        handler = type("BoundHubHandler", (HubHandler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a folder of repos as a Hub on 127.0.0.1.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--throttle", type=float, default=None, help="bytes per second per download")
    opts = parser.parse_args()
    server = HubServer(opts.root, opts.port, opts.throttle)
    print(server.url, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
