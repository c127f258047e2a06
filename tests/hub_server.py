"""A fake Hugging Face Hub on 127.0.0.1 for the Hub tests: model folders on disk served the way the Hub's
endpoints answer huggingface_hub, every request counted.

    GET  /api/models/{org}/{name}/revision/{rev}          {"id", "sha", "siblings": [{"rfilename"}], ...}
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]      [{"type": "file", "path", "size", "oid"}, ...]
    HEAD /{org}/{name}/resolve/{rev}/{file}               X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{file}               the bytes; "Range: bytes=N-" answers 206

A repo in ``private`` answers 401 unless ``Authorization: Bearer <token>`` matches ``token``; an unknown
repo 404 (X-Error-Code RepoNotFound), an unknown revision 404 (RevisionNotFound). A file in ``drop_once``
is cut off halfway on its first full GET (the connection closes), to test resumed downloads.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class FakeHub:
    repos: dict = field(default_factory=dict)  # repo id -> {revision name or commit: (commit, folder)}
    private: set = field(default_factory=set)
    token: str = "hf_test_token"
    drop_once: set = field(default_factory=set)  # "repo/file" paths
    requests: list = field(default_factory=list)  # (method, path, Range header)

    def add(self, repo_id: str, folder: Path, revision: str = "main") -> str:
        """Serve ``folder`` as ``repo_id`` at ``revision``; returns the commit (a hash of the files)."""
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
        commit = digest.hexdigest()
        self.repos.setdefault(repo_id, {})[revision] = (commit, Path(folder))
        self.repos[repo_id][commit] = (commit, Path(folder))
        return commit

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, head=True)

            def do_GET(self):
                hub._answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------ answers

    def _error(self, h, status: int, code: str | None = None, message: str = "") -> None:
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message or code or "error")
        body = json.dumps({"error": message or code}).encode()
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, value, head: bool) -> None:
        body = json.dumps(value).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _repo(self, h, repo_id: str, revision: str):
        """(commit, folder), or None after answering the error."""
        if repo_id not in self.repos:
            self._error(h, 404, "RepoNotFound", "Repository not found")
            return None
        if repo_id in self.private and h.headers.get("Authorization") != f"Bearer {self.token}":
            self._error(h, 401, None, "Invalid username or password.")
            return None
        if revision not in self.repos[repo_id]:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return self.repos[repo_id][revision]

    def _answer(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, revision = "/".join(parts[2:4]), parts[5]
            found = self._repo(h, repo_id, revision)
            if found is None:
                return
            commit, folder = found
            names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            if parts[4] == "revision":
                return self._json(h, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo_id in self.private,
                                      "siblings": [{"rfilename": n} for n in names]}, head)
            prefix = "/".join(parts[6:])
            entries = [{"type": "file", "path": n, "size": (folder / n).stat().st_size,
                        "oid": hashlib.sha1((folder / n).read_bytes()).hexdigest()}
                       for n in names if n.startswith(prefix)]
            return self._json(h, entries, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            found = self._repo(h, repo_id, revision)
            if found is None:
                return
            commit, folder = found
            if not (folder / name).is_file():
                return self._error(h, 404, "EntryNotFound", f"{name} not found")
            return self._file(h, repo_id, commit, folder / name, name, head)
        self._error(h, 404, None, "no such endpoint")

    def _file(self, h, repo_id: str, commit: str, path: Path, name: str, head: bool) -> None:
        data = path.read_bytes()
        start = 0
        ranged = h.headers.get("Range")
        if ranged and ranged.startswith("bytes=") and not head:
            start = int(ranged[len("bytes="):].split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if head:
            return
        key = f"{repo_id}/{name}"
        if key in self.drop_once and not start:
            self.drop_once.discard(key)
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            import socket

            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data[start:])
