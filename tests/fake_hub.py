"""A local stand-in for the Hugging Face Hub's file endpoint, on 127.0.0.1.

It answers ``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{path}`` from a folder the way the
Hub does for plain (non-LFS, non-Xet) files: the commit in ``X-Repo-Commit``, an ``ETag``, the
size, and a 404 with ``X-Error-Code: EntryNotFound`` for a missing file (``RepoNotFound`` for
another repo).
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _handler(repo_id: str, folder: Path, requests: list[str]):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _answer(self, with_body: bool) -> None:
            path = unquote(self.path.split("?")[0]).lstrip("/")
            requests.append(f"{self.command} {path}")
            prefix = f"{repo_id}/resolve/"
            if not path.startswith(prefix):
                self._error(404, "RepoNotFound")
                return
            _, _, rel = path[len(prefix) :].partition("/")
            file = (folder / rel).resolve()
            if folder.resolve() not in file.parents or not file.is_file():
                self._error(404, "EntryNotFound")
                return
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def _error(self, status: int, code: str) -> None:
            body = f'{{"error": "{code}"}}'.encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(with_body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._answer(with_body=True)

    return Handler


@contextmanager
def serve_repo(repo_id: str, folder: Path):
    """Serve `folder` as Hub repo `repo_id`; yields (endpoint URL, list of requests seen)."""
    requests: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(repo_id, folder, requests))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
