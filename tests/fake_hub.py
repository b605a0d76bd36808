"""A local stand-in for the Hugging Face Hub, on 127.0.0.1, serving one repo from a folder.

It answers what ``huggingface_hub`` asks of the Hub to download, list and commit plain (non-LFS,
non-Xet) files:
- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: the file, with ``X-Repo-Commit``, an ``ETag``
  and the size; 404 with ``X-Error-Code: EntryNotFound`` (``RepoNotFound`` for another repo);
- ``GET /api/models/{repo}[/revision/{revision}]`` and ``/api/models/{repo}/tree/{revision}``;
- ``POST /api/repos/create``, ``/api/models/{repo}/branch/{name}``, ``.../preupload/{revision}``
  (every file "regular") and ``.../commit/{revision}`` (ndjson; writes the files into the folder
  and moves the commit id).
Branches are not kept apart: every revision reads and writes the one folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Repo:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.folder, self.commit = repo_id, folder, COMMIT
        self.requests: list[str] = []
        self.commits: list[dict] = []  # {"revision", "summary", "paths"} per commit received

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file()) if self.folder.is_dir() else []

    def file(self, rel: str) -> Path | None:
        file = (self.folder / rel).resolve()
        return file if self.folder.resolve() in file.parents and file.is_file() else None

    def write(self, rel: str, data: bytes) -> None:
        target = (self.folder / rel).resolve()
        if self.folder.resolve() not in target.parents:
            raise ValueError(f"path outside the repo: {rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    def commit_ndjson(self, revision: str, body: bytes) -> str:
        summary, paths = "", []
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                value = item["value"]
                self.write(value["path"], base64.b64decode(value["content"]))
                paths.append(value["path"])
            else:
                raise ValueError(f"unsupported commit operation {item['key']}")
        self.commits.append({"revision": revision, "summary": summary, "paths": paths})
        self.commit = hashlib.sha1(f"{self.commit}{len(self.commits)}".encode()).hexdigest()
        return self.commit


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(repo: _Repo):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _path(self) -> str:
            path = unquote(self.path.split("?")[0]).lstrip("/")
            repo.requests.append(f"{self.command} {path}")
            return path

        def _json(self, obj, status: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str) -> None:
            body = f'{{"error": "{code}"}}'.encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _resolve(self, rel: str, with_body: bool) -> None:
            file = repo.file(rel)
            if file is None:
                self._error(404, "EntryNotFound")
                return
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def _api_get(self, rest: str) -> None:
            if rest == "" or rest.startswith("revision/"):
                siblings = [{"rfilename": p.relative_to(repo.folder).as_posix()} for p in repo.files()]
                self._json({"id": repo.repo_id, "sha": repo.commit, "private": False, "siblings": siblings})
            elif rest.startswith("tree/"):
                entries = [
                    {
                        "type": "file",
                        "path": p.relative_to(repo.folder).as_posix(),
                        "size": p.stat().st_size,
                        "oid": _blob_id(p.read_bytes()),
                    }
                    for p in repo.files()
                ]
                self._json(entries)
            else:
                self._error(404, "EntryNotFound")

        def _get(self, with_body: bool) -> None:
            path = self._path()
            api = f"api/models/{repo.repo_id}"
            if path == api or path.startswith(api + "/"):
                self._api_get(path[len(api) :].lstrip("/"))
            elif path.startswith(f"{repo.repo_id}/resolve/"):
                self._resolve(path[len(f"{repo.repo_id}/resolve/") :].partition("/")[2], with_body)
            else:
                self._error(404, "RepoNotFound")

        def do_HEAD(self) -> None:  # noqa: N802
            self._get(with_body=False)

        def do_GET(self) -> None:  # noqa: N802
            self._get(with_body=True)

        def do_POST(self) -> None:  # noqa: N802
            path = self._path()
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            api = f"api/models/{repo.repo_id}/"
            if path == "api/repos/create":
                self._json({"url": f"http://{self.headers['Host']}/{repo.repo_id}"})
            elif path.startswith(api + "branch/"):
                self._json({})
            elif path.startswith(api + "preupload/"):
                files = json.loads(body)["files"]
                self._json(
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            elif path.startswith(api + "commit/"):
                oid = repo.commit_ndjson(path[len(api + "commit/") :], body)
                self._json(
                    {"commitUrl": f"http://{self.headers['Host']}/{repo.repo_id}/commit/{oid}", "commitOid": oid}
                )
            else:
                self._error(404, "RepoNotFound")

    return Handler


@contextmanager
def serve_hub(repo_id: str, folder: Path):
    """Serve `folder` as Hub repo `repo_id`; yields (endpoint URL, the repo: its requests and commits)."""
    repo = _Repo(repo_id, folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(repo))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", repo
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_repo(repo_id: str, folder: Path):
    """Serve `folder` as Hub repo `repo_id`; yields (endpoint URL, list of requests seen)."""
    with serve_hub(repo_id, folder) as (endpoint, repo):
        yield endpoint, repo.requests
