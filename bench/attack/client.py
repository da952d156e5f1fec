"""The servers under attack (start, readiness, RSS, stop), a raw-socket HTTP/1.1 client, and the job readers."""

from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "bench" / "results" / "serve_attack.json"
API_KEY = "attack-key-0123456789"
HANG_S = 30.0
HEALTH_S = 2.0


# -- servers ---------------------------------------------------------------------------------------------------
def code_version() -> dict:
    """The commit the server ran (read-only git queries) and whether qimg/ differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qimg"], cwd=ROOT, capture_output=True,
                               text=True, check=False).stdout.strip()
        return {"commit": commit, "qimg_modified": bool(dirty)}
    except OSError:
        return {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, workdir: Path, name: str, extra: list[str]):
        self.port = free_port()
        self.log = workdir / f"{name}.log"
        self.data = workdir / f"{name}-data"
        cmd = [sys.executable, "-m", "qimg.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data), "--log-level", "warning", *extra]
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def wait_ready(self, timeout=180.0, need_models=True):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            r = exchange(self.port, "GET", "/health", timeout=2)
            if r.status == 200:
                health = r.json() or {}
                if not need_models or not health.get("queue", {}).get("loading_models", True):
                    return health
            time.sleep(0.2)
        raise TimeoutError("the server did not become ready")

    def rss_mb(self) -> float | None:
        try:
            import psutil

            return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)
        except Exception:  # noqa: BLE001 - psutil missing or process gone
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


# -- a raw HTTP/1.1 client ---------------------------------------------------------------------------------------
@dataclass
class Resp:
    status: int | None = None
    reason: str = ""
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    elapsed: float = 0.0  # seconds to the status line (or to the failure)
    total: float = 0.0  # seconds to the end of the body
    hang: bool = False
    error: str | None = None  # the client's failure: reset, closed without an answer, ...

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def build_request(port, method, path, headers=(), body=None, *, chunked=False, host=True) -> tuple[bytes, list]:
    """(head bytes, body pieces). `headers`: (name, value) pairs; Content-Length is added unless given."""
    names = {(_b(k).lower()) for k, _ in headers}
    lines = [_b(method) + b" " + _b(path) + b" HTTP/1.1"]
    if host and b"host" not in names:
        lines.append(b"Host: 127.0.0.1:%d" % port)
    if b"connection" not in names:
        lines.append(b"Connection: close")
    lines += [_b(k) + b": " + _b(v) for k, v in headers]
    pieces = []
    if body is not None:
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
            step = 64 * 1024
            for i in range(0, len(body), step):
                part = body[i:i + step]
                pieces.append(b"%x\r\n" % len(part) + part + b"\r\n")
            pieces.append(b"0\r\n\r\n")
        else:
            if b"content-length" not in names:
                lines.append(b"Content-Length: %d" % len(body))
            step = 256 * 1024
            pieces = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
    return b"\r\n".join(lines) + b"\r\n\r\n", pieces


def _decode_chunked(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            return bytes(out)
        try:
            size = int(data[i:j].split(b";")[0], 16)
        except ValueError:
            return bytes(out)
        if size == 0:
            return bytes(out)
        out += data[j + 2:j + 2 + size]
        i = j + 2 + size + 2


def transfer(port, raw_head: bytes, pieces=(), *, method="GET", timeout=HANG_S, body_timeout=120.0) -> Resp:
    """Send the head and body pieces (stopping early if the server answers first), read one response."""
    r = Resp()
    start = time.perf_counter()
    deadline = start + timeout
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as err:
        r.error, r.elapsed = f"connect: {err}", time.perf_counter() - start
        return r
    buf = bytearray()
    try:
        s.setblocking(False)
        current = memoryview(b"".join([raw_head, *pieces]))
        eof = False
        # send while reading whatever comes back
        while current is not None:
            now = time.perf_counter()
            if now > deadline:
                break
            rd, wr, _ = select.select([s], [s], [], min(0.5, deadline - now))
            if rd:
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError) as err:
                    r.error = f"reset while sending: {err}"
                    eof = True
                    break
                if not data:
                    eof = True
                    break
                buf += data
                if b"\r\n\r\n" in buf:  # an answer before the body was all sent
                    break
            if wr:
                try:
                    sent = s.send(current[:262144])
                except (ConnectionResetError, BrokenPipeError) as err:
                    r.error = f"reset while sending: {err}"
                    break
                current = current[sent:]
                if not len(current):
                    current = None
        # read the status line and headers (skipping 1xx)
        body_deadline = None
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                first = bytes(buf[:head_end]).split(b"\r\n", 1)[0]
                parts = first.split(b" ", 2)
                code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
                if code is not None and 100 <= code < 200:
                    del buf[:head_end + 4]
                    continue
                break
            if eof or time.perf_counter() > deadline:
                break
            rd, _, _ = select.select([s], [], [], min(0.5, max(0.0, deadline - time.perf_counter())))
            if rd:
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BrokenPipeError) as err:
                    r.error = f"reset: {err}"
                    eof = True
                    continue
                if not data:
                    eof = True
                else:
                    buf += data
        head_end = buf.find(b"\r\n\r\n")
        r.elapsed = time.perf_counter() - start
        if head_end < 0:
            if not eof and time.perf_counter() >= deadline:
                r.hang = True
                r.error = r.error or f"no answer within {timeout:g} s"
            else:
                r.error = r.error or ("closed without an answer" if not buf else f"garbage answer {bytes(buf[:80])!r}")
            return r
        head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        r.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
        r.reason = parts[2] if len(parts) > 2 else ""
        for line in head[1:]:
            k, _, v = line.partition(":")
            r.headers[k.strip().lower()] = v.strip()
        body = buf[head_end + 4:]
        no_body = method == "HEAD" or r.status in (204, 304)
        length = r.headers.get("content-length")
        want = 0 if no_body else (int(length) if length and length.isdigit() else None)
        body_deadline = time.perf_counter() + body_timeout
        while not eof and (want is None or len(body) < want) and time.perf_counter() < body_deadline:
            rd, _, _ = select.select([s], [], [], 0.5)
            if rd:
                try:
                    data = s.recv(262144)
                except (ConnectionResetError, BrokenPipeError):
                    break
                if not data:
                    break
                body += data
        if r.headers.get("transfer-encoding", "").lower() == "chunked":
            body = _decode_chunked(bytes(body))
        r.body = bytes(body)
        r.total = time.perf_counter() - start
        return r
    finally:
        try:
            s.close()
        except OSError:
            pass


def exchange(port, method, path, headers=(), body=None, *, chunked=False, host=True, timeout=HANG_S,
             body_timeout=120.0) -> Resp:
    head, pieces = build_request(port, method, path, headers, body, chunked=chunked, host=host)
    return transfer(port, head, pieces, method=method, timeout=timeout, body_timeout=body_timeout)


def stored_jobs(data_dir: Path) -> list[dict]:
    """The job rows as the server stored them (read-only): for when the API cannot list them."""
    db = sqlite3.connect(f"file:{data_dir / 'jobs.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT id, status, error, error_type, params FROM jobs ORDER BY seq").fetchall()
    finally:
        db.close()
    out = []
    for job_id, status, error, error_type, params in rows:
        try:
            seed = json.loads(params).get("seed")
        except ValueError:
            seed = None
        out.append({"id": job_id, "status": status, "seed": seed, "params_text": params,
                    "error": {"message": error, "type": error_type} if error else None})
    return out


def all_jobs(port) -> tuple[list[dict], list[str]]:
    jobs, problems, before = [], [], None
    for _ in range(1000):
        q = "/v1/jobs?limit=200" + (f"&before={before}" if before else "")
        r = exchange(port, "GET", q)
        if r.status != 200:
            problems.append(f"GET {q} -> {r.status} {r.body[:200]!r}")
            break
        page = r.json()
        jobs += page["data"]
        if not page["has_more"] or not page["data"]:
            break
        before = page["data"][-1]["id"]
    return jobs, problems
