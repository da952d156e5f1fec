"""A stand-in for the Hugging Face Hub on 127.0.0.1 (test helper, no tests here): the routes `huggingface_hub`'s
`snapshot_download` uses, serving folders from disk. `/api/models/{repo}/revision/{rev}` (repo_info) and
`/api/models/{repo}/tree/{rev}` list the files; `/{repo}/resolve/{rev}/{path}` answers HEAD with the commit, ETag and size and GET with the bytes, honouring
`Range` (resumed downloads). `cut` makes the next GETs of a file stop half-way, as a dropped connection would."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.cut: dict[str, int] = {}  # "repo/path" -> how many more GETs of it stop half-way
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.log.append((handler.command, path, handler.headers.get("Range")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if info and info.group(1) in self.repos:
            repo = info.group(1)
            data = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                               "siblings": [{"rfilename": f} for f in self.files(repo)]}).encode()
            return self._send(handler, 200, data, {"Content-Type": "application/json"}, body)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if tree and tree.group(1) in self.repos:  # the file listing (recursive)
            repo, root = tree.group(1), self.repos[tree.group(1)]
            entries, folders = [], set()
            for name in self.files(repo):
                data = (root / name).read_bytes()
                parts = name.split("/")
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                entries.append({"type": "file", "path": name, "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest(),
                                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}})
            entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                        for f in sorted(folders)]
            return self._send(handler, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"},
                              body)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve and resolve.group(1) in self.repos:
            repo, name = resolve.group(1), resolve.group(3)
            file = self.repos[repo] / name
            if name in self.files(repo):
                return self._send_file(handler, repo, name, file.read_bytes(), body)
        self._send(handler, 404, b'{"error": "Repository Not Found"}',
                   {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}, body)

    def _send_file(self, handler, repo: str, name: str, data: bytes, body: bool) -> None:
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
        part = data[start:]
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        key = f"{repo}/{name}"
        if body and self.cut.get(key, 0) > 0:
            self.cut[key] -= 1
            handler.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(part))}.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(part[: len(part) // 2])
            handler.wfile.flush()
            time.sleep(0.3)  # the half arrives before the connection drops
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        self._send(handler, status, part, headers, body)

    @staticmethod
    def _send(handler, status: int, data: bytes, headers: dict, body: bool) -> None:
        handler.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            handler.send_header(k, v)
        handler.end_headers()
        if body:
            handler.wfile.write(data)
