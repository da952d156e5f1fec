"""Hostile requests against a live `qimg serve`: hundreds of bad, malformed and limit-probing requests to every route.

    python bench/serve_attack.py [--only SUBSTRING] [--timeout 30] [--output bench/results/serve_attack.json]

Starts `python -m qimg.cli serve` (the embedded qimg-tiny and qimg-tiny-layered models, `--max-queue 16
--job-timeout 20`) on a free 127.0.0.1 port with a temporary data directory, and a second one with `--api-key` for
the authorization cases. The cases are generated systematically as (name, method, path, headers, body): wrong types
for every field, values at and just past every limit, lone UTF-16 surrogates in every string field, control
characters, huge and deeply nested bodies, wrong content types, hostile multipart uploads (no image, 11 images,
empty, truncated, not an image, GIF/BMP/TIFF, a 1-bit 20000x20000 PNG bomb, 40 MB, a mask), path traversal in ids,
methods not allowed, HEAD and Range requests, protocol-level garbage, a client that disconnects mid-body, a
slowloris-ish partial header held open while other requests run, and bad Authorization headers.

Requests are sent with a small raw-socket HTTP/1.1 client (`Connection: close`) so that any byte sequence can be
sent and an early answer (413 before the body is sent) is read. For each case: the HTTP status, whether an error has
OpenAI's shape {"error": {"message", "type", "param", "code"}} with a non-empty message, the elapsed time; a "hang" is
no status line within --timeout (30 s). After each case GET /health must answer within 2 s. Jobs a case created
asynchronously (202) are cancelled. At the end: the server is still alive, GET /v1/jobs (paged) and every listed job
answer 200, no job failed with a server error, and the server's RSS before and after.

Prints a table (case, status, ms, ok, message) and a summary line; writes bench/results/serve_attack.json.
Exit code 1 if any case got a 5xx or hung (or a job failed with a server error, or the server died).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import secrets
import select
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve_attack.json"
API_KEY = "attack-key-0123456789"
HANG_S = 30.0
HEALTH_S = 2.0

sys.set_int_max_str_digits(0)  # the bench itself builds 5000-digit numbers


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


# -- bodies --------------------------------------------------------------------------------------------------------
JSON_CT = ("Content-Type", "application/json")


def jbody(obj) -> bytes:
    """JSON text; lone surrogates become `\\udXXX` escapes (ensure_ascii), NaN/Infinity are sent as literals."""
    return json.dumps(obj).encode("ascii")


def multipart(parts, boundary=None) -> tuple[bytes, str]:
    """parts: (name, data, filename or None, content type or None)."""
    b = boundary or "qimgattack" + secrets.token_hex(8)
    out = bytearray()
    for name, data, filename, ctype in parts:
        out += b"--" + b.encode() + b"\r\n"
        disp = b'Content-Disposition: form-data; name="' + _u(name) + b'"'
        if filename is not None:
            disp += b'; filename="' + _u(filename) + b'"'
        out += disp + b"\r\n"
        if ctype:
            out += b"Content-Type: " + ctype.encode() + b"\r\n"
        out += b"\r\n" + (data if isinstance(data, bytes) else str(data).encode("utf-8")) + b"\r\n"
    out += b"--" + b.encode() + b"--\r\n"
    return bytes(out), f"multipart/form-data; boundary={b}"


def _u(text) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")


def image_bytes(fmt="PNG", size=(64, 64), mode="RGB", color=(200, 30, 30), **save) -> bytes:
    from PIL import Image

    if mode in ("1", "L", "I;16", "I", "P"):
        color = 1 if mode == "1" else 120
    elif mode in ("LA",):
        color = (120, 200)
    elif mode == "CMYK":
        color = (0, 200, 200, 0)
    elif mode == "RGBA":
        color = (200, 30, 30, 128)
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(w: int, h: int, bit_depth=1, color_type=0, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims w x h; `idat` (or a tiny, far too short stream) follows, then IEND."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png_bomb(side=20000) -> bytes:
    """A valid 1-bit side x side PNG of zeros, compressed: tens of KB that decode to side^2 pixels."""
    row = b"\0" + b"\0" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    data = bytearray()
    for _ in range(side):
        data += comp.compress(row)
    data += comp.flush()
    return png_header_only(side, side, 1, 0, bytes(data))


def animated_webp() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def exif_jpeg() -> bytes:
    from PIL import Image

    img = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


def padded_png(total: int) -> bytes:
    """A valid PNG followed by zero bytes up to `total` bytes (decoders stop at IEND)."""
    data = image_bytes()
    return data + b"\0" * (total - len(data))


# -- cases -----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    method: str = "GET"
    path: str = "/health"
    headers: list = field(default_factory=list)
    body: bytes | None = None
    expect: str | None = None  # "2xx", "4xx", "400", "404", ...: what a correct server answers (None: either)
    server: str = "main"  # or "auth"
    chunked: bool = False
    host: bool = True
    raw: bytes | None = None  # the whole request, sent as is
    fn: Callable | None = None  # a custom case: fn(ctx) -> (Resp, note)
    async_job: bool = False  # sends Prefer: respond-async; a 202's job is cancelled after
    group: str = ""


def expect_ok(expect: str | None, status: int | None) -> bool:
    if expect is None or status is None:
        return True
    return any(str(status)[0] == e[0] if e.endswith("xx") else status == int(e) for e in expect.split("|"))


GEN = {"prompt": "a red circle", "size": "128x128", "steps": 1, "seed": 7}

# every JSON field of /v1/images/generations and the type it takes
GEN_FIELDS = {
    "prompt": "str", "model": "str", "size": "str", "quality": "str", "moderation": "str", "style": "str",
    "user": "str", "negative_prompt": "str", "sampler": "str", "preset": "str",
    "n": "int", "steps": "int", "seed": "int", "output_compression": "int", "partial_images": "int",
    "num_inference_steps": "int",
    "guidance_scale": "float", "true_cfg_scale": "float", "shift": "float",
    "stream": "bool", "cfg_normalize": "bool",
    "response_format": "literal", "output_format": "literal", "background": "literal",
    "sigmas": "float_list", "loras": "object_list", "scheduler_config": "object",
}
WRONG_TYPES = {
    "str": {"int": 123, "bool": True, "float": 1.5, "list": ["a"], "object": {"a": "b"}},
    "int": {"str": "3", "bool": True, "float": 2.5, "list": [1], "object": {"v": 1}},
    "float": {"str": "2.0", "bool": True, "list": [1.0], "object": {"v": 1.0}},
    "bool": {"str": "true", "int": 1, "float": 1.0, "list": [True], "object": {}},
    "literal": {"int": 1, "bool": True, "list": ["png"], "object": {"v": "png"}, "unknown_str": "gif"},
    "float_list": {"str": "0.5", "float": 0.5, "bool": True, "object": {"0": 0.5}, "list_of_str": ["0.5"],
                   "list_of_bool": [True], "list_of_list": [[0.5]]},
    "object_list": {"bad_json_str": "not json", "float": 0.5, "object": {"name": "x"}, "list_of_int": [1],
                    "name_int": [{"name": 1}], "scale_str": [{"name": "a", "scale": "1"}],
                    "extra_key": [{"name": "a", "extra": 1}], "missing_name": [{"scale": 1.0}]},
    "object": {"str": "{}", "list": [], "int": 1, "bool": True},
}


def gen_case(name, body=None, *, raw=None, expect="4xx", headers=(), async_job=False, **kw) -> Case:
    data = raw if raw is not None else jbody(body)
    return Case(f"gen.{name}", "POST", "/v1/images/generations", [JSON_CT, *headers], data, expect,
                async_job=async_job, group="generations", **kw)


def with_(**changes) -> dict:
    body = dict(GEN)
    for k, v in changes.items():
        if v is _DROP:
            body.pop(k, None)
        else:
            body[k] = v
    return body


_DROP = object()


def generation_cases() -> list[Case]:
    cases = []
    # 1. wrong types for every field
    for fld, kind in GEN_FIELDS.items():
        for tname, value in WRONG_TYPES[kind].items():
            cases.append(gen_case(f"type.{fld}.{tname}", with_(**{fld: value})))
    for fld in ("prompt", "n", "size"):
        cases.append(gen_case(f"type.{fld}.null", with_(**{fld: None}),
                              expect="2xx" if fld == "size" else "4xx"))
    cases.append(gen_case("type.steps.null_is_default", with_(steps=None), expect="2xx"))
    cases.append(gen_case("type.steps.float_integral", with_(steps=1.0)))
    cases.append(gen_case("type.seed.float_integral", with_(seed=3.0)))
    cases.append(gen_case("type.loras.json_string_in_json_body", with_(loras="[]"), expect=None))
    # 2. at and just past every limit
    big = "9" * 5000
    limits = [
        ("steps.0", with_(steps=0), "4xx"), ("steps.1", with_(steps=1), "2xx"), ("steps.-1", with_(steps=-1), "4xx"),
        ("steps.1001", with_(steps=1001), "4xx"), ("steps.2**63", with_(steps=2**63), "4xx"),
        ("num_inference_steps.0", with_(steps=_DROP, num_inference_steps=0), "4xx"),
        ("num_inference_steps.1001", with_(steps=_DROP, num_inference_steps=1001), "4xx"),
        ("n.0", with_(n=0), "4xx"), ("n.-1", with_(n=-1), "4xx"), ("n.10_max", with_(n=10), "2xx"),
        ("n.11", with_(n=11), "4xx"), ("n.10**30", with_(n=10**30), "4xx"),
        ("size.0x0", with_(size="0x0"), "4xx"), ("size.99999x99999", with_(size="99999x99999"), "4xx"),
        ("size.auto", with_(size="auto"), "2xx"), ("size.64x", with_(size="64x"), "4xx"),
        ("size.x64", with_(size="x64"), "4xx"), ("size.-64x64", with_(size="-64x64"), "4xx"),
        ("size.128x-128", with_(size="128x-128"), "4xx"), ("size.1x1", with_(size="1x1"), "4xx"),
        ("size.15x15", with_(size="15x15"), "4xx"), ("size.16x16_min", with_(size="16x16"), None),
        ("size.4097x16", with_(size="4097x16"), "4xx"), ("size.128X128_upper", with_(size="128X128"), "2xx"),
        ("size.spaces", with_(size=" 128 x 128 "), "2xx"), ("size.3d", with_(size="128x128x128"), "4xx"),
        ("size.1e3x1e3", with_(size="1e3x1e3"), "4xx"), ("size.fullwidth_digits", with_(size="１２８x１２８"), None),
        ("size.1000000x1", with_(size="1000000x1"), "4xx"), ("size.empty", with_(size=""), "4xx"),
        ("size.100_chars", with_(size="1" * 100), "4xx"), ("size.101_chars", with_(size="1" * 101), "4xx"),
        ("size.512x512_steps1_in_budget", with_(size="512x512"), "2xx"),
        ("seed.0", with_(seed=0), "2xx"), ("seed.2**63-1", with_(seed=2**63 - 1), "2xx"),
        ("seed.2**63", with_(seed=2**63), "4xx"), ("seed.2**64", with_(seed=2**64), "4xx"),
        ("seed.-1", with_(seed=-1), "4xx"), ("seed.-2**63", with_(seed=-2**63), "4xx"),
        ("guidance_scale.-1", with_(guidance_scale=-1), "4xx"), ("guidance_scale.0", with_(guidance_scale=0), "2xx"),
        ("guidance_scale.100", with_(guidance_scale=100), "2xx"),
        ("guidance_scale.101", with_(guidance_scale=101), "4xx"),
        ("guidance_scale.NaN_string", with_(guidance_scale="NaN"), "4xx"),
        ("guidance_scale.NaN_literal", with_(guidance_scale=float("nan")), "4xx"),
        ("guidance_scale.Infinity_literal", with_(guidance_scale=float("inf")), "4xx"),
        ("guidance_scale.1e999_overflow", None, "4xx"),
        ("true_cfg_scale.-1", with_(true_cfg_scale=-1), "4xx"), ("true_cfg_scale.101", with_(true_cfg_scale=101), "4xx"),
        ("true_cfg_scale.NaN_literal", with_(true_cfg_scale=float("nan")), "4xx"),
        ("shift.0", with_(shift=0), "4xx"), ("shift.-1", with_(shift=-1), "4xx"), ("shift.101", with_(shift=101), "4xx"),
        ("shift.tiny", with_(shift=1e-300), None), ("shift.NaN_literal", with_(shift=float("nan")), "4xx"),
        ("output_compression.-1", with_(output_compression=-1), "4xx"),
        ("output_compression.101", with_(output_compression=101), "4xx"),
        ("output_compression.0_jpeg", with_(output_compression=0, output_format="jpeg"), "2xx"),
        ("partial_images.4", with_(partial_images=4), "4xx"), ("partial_images.-1", with_(partial_images=-1), "4xx"),
        ("sigmas.empty", with_(sigmas=[]), "4xx"), ("sigmas.1001", with_(sigmas=[0.5] * 1001), "4xx"),
        ("sigmas.0", with_(sigmas=[0.0]), "4xx"), ("sigmas.2", with_(sigmas=[2.0]), "4xx"),
        ("sigmas.-1", with_(sigmas=[-1.0]), "4xx"), ("sigmas.NaN_literal", with_(sigmas=[float("nan")]), "4xx"),
        ("sigmas.Infinity_literal", with_(sigmas=[float("inf")]), "4xx"),
        ("sigmas.valid_1", with_(sigmas=[1.0]), None), ("sigmas.increasing", with_(sigmas=[0.2, 0.9]), None),
        ("loras.9_entries", with_(loras=[{"name": f"l{i}"} for i in range(9)]), "4xx"),
        ("loras.unknown_name", with_(loras=[{"name": "nope"}]), "4xx"),
        ("loras.traversal_name", with_(loras=[{"name": "../../etc/passwd"}]), "4xx"),
        ("loras.scale_9", with_(loras=[{"name": "a", "scale": 9}]), "4xx"),
        ("loras.scale_NaN", with_(loras=[{"name": "a", "scale": float("nan")}]), "4xx"),
        ("loras.empty_name", with_(loras=[{"name": ""}]), "4xx"),
        ("scheduler_config.unknown_key", with_(scheduler_config={"bogus": 1}), "4xx"),
        ("scheduler_config.shift_negative", with_(scheduler_config={"shift": -1}), None),
        ("scheduler_config.timesteps_0", with_(scheduler_config={"num_train_timesteps": 0}), None),
        ("scheduler_config.value_object", with_(scheduler_config={"shift": {"a": 1}}), "4xx"),
        ("scheduler_config.underscore_key_is_metadata", with_(scheduler_config={"__class__": "x"}), None),
        ("scheduler_config.fixed_shift_string", with_(scheduler_config={"use_dynamic_shifting": False,
                                                                        "shift": "abc"}), "4xx"),
        ("scheduler_config.fixed_shift_negative", with_(scheduler_config={"use_dynamic_shifting": False,
                                                                          "shift": -1}), None),
        ("scheduler_config.seq_len_equal_div0", with_(scheduler_config={"use_dynamic_shifting": True,
                                                                        "base_image_seq_len": 4096}), None),
        ("scheduler_config.max_shift_1e308", with_(scheduler_config={"use_dynamic_shifting": True,
                                                                     "max_shift": 1e308}), None),
        ("scheduler_config.shift_terminal_2", with_(scheduler_config={"shift_terminal": 2}), None),
        ("scheduler_config.dynamic_string", with_(scheduler_config={"use_dynamic_shifting": "yes"}), "4xx"),
        ("scheduler_config.timesteps_string", with_(scheduler_config={"num_train_timesteps": "x"}), "4xx"),
        ("scheduler_config.time_shift_type_list", with_(scheduler_config={"time_shift_type": ["linear"]}), "4xx"),
        ("sampler.unknown", with_(sampler="nope"), "4xx"), ("sampler.101_chars", with_(sampler="e" * 101), "4xx"),
        ("preset.unknown", with_(preset="nope"), "4xx"),
        ("response_format.url", with_(response_format="url"), "2xx"),
        ("background.transparent_jpeg", with_(background="transparent", output_format="jpeg"), "4xx"),
        ("output_format.webp", with_(output_format="webp"), "2xx"),
        ("stream.true", with_(stream=True, partial_images=2, steps=3), "2xx"),
        ("model.unknown", with_(model="nope"), "4xx"), ("model.layered_for_generate", with_(model="qimg-tiny-layered"), "4xx"),
        ("model.empty_is_auto", with_(model=""), "2xx"), ("model.1001_chars", with_(model="m" * 1001), "4xx"),
        ("model.traversal", with_(model="../../etc/passwd"), "4xx"),
        ("user.1001_chars", with_(user="u" * 1001), "4xx"),
        ("prompt.empty", with_(prompt=""), "4xx"), ("prompt.blank", with_(prompt=" \t\n "), "4xx"),
        ("prompt.32000_at_limit", with_(prompt="a" * 32000), None),
        ("prompt.32001_over_limit", with_(prompt="a" * 32001), "4xx"),
        ("prompt.100k_chars", with_(prompt="a red circle " * 7700), "4xx"),
        ("negative_prompt.32001", with_(negative_prompt="b" * 32001), "4xx"),
        ("prompt.control_chars", with_(prompt="a\x00b\x01c\x1b[31m\x7f\x08d"), "2xx"),
        ("prompt.nul_only", with_(prompt="\x00"), None),
        ("prompt.crlf_header_injection", with_(prompt="x\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.1"), "2xx"),
        ("prompt.bidi_and_zero_width", with_(prompt="\u202e\u200b\ufeffred circle\u2066"), "2xx"),
        ("prompt.astral_and_combining", with_(prompt="\U0001F600" * 50 + "e\u0301" * 50), "2xx"),
        ("negative_prompt.control_chars", with_(negative_prompt="\x00\x1f"), None),
        ("quality.hd", with_(quality="hd"), "2xx"),
    ]
    for name, body, expect in limits:
        if name == "guidance_scale.1e999_overflow":
            cases.append(gen_case(f"limit.{name}", raw=b'{"prompt": "x", "steps": 1, "guidance_scale": 1e999}',
                                  expect=expect))
            continue
        cases.append(gen_case(f"limit.{name}", body, expect=expect))
    cases.append(gen_case("limit.seed.5000_digits", raw=b'{"prompt": "x", "steps": 1, "seed": ' + big.encode() + b"}",
                          expect="4xx"))
    cases.append(gen_case("limit.steps.5000_digits", raw=b'{"prompt": "x", "steps": ' + big.encode() + b"}",
                          expect="4xx"))
    cases.append(gen_case("limit.steps.1000_async_cancelled", with_(steps=1000), expect="2xx", async_job=True))
    cases.append(gen_case("limit.n.10_steps1000_async_cancelled", with_(n=10, steps=1000, size="64x64"),
                          expect="2xx", async_job=True))
    cases.append(gen_case("limit.cost_over_budget", with_(size="4096x4096", steps=100), expect="4xx"))
    # 3. lone UTF-16 surrogates in every string field (and in keys), sent as JSON escapes
    for fld in ("prompt", "negative_prompt", "model", "size", "quality", "moderation", "style", "user", "sampler",
                "preset", "response_format", "output_format", "background"):
        cases.append(gen_case(f"surrogate.{fld}", with_(**{fld: "a \ud800 b"})))
    cases.append(gen_case("surrogate.low_dc00_prompt", with_(prompt="\udc00")))
    cases.append(gen_case("surrogate.loras_name", with_(loras=[{"name": "\udfff", "scale": 1}])))
    cases.append(gen_case("surrogate.scheduler_config_key", with_(scheduler_config={"\ud800": 1})))
    cases.append(gen_case("surrogate.scheduler_config_value", with_(scheduler_config={"shift": "\ud800"})))
    cases.append(gen_case("surrogate.unknown_key", with_(**{"\ud800": 1})))
    cases.append(gen_case("surrogate.raw_cesu_bytes_in_prompt", raw=b'{"prompt": "a \xed\xa0\x80 b"}'))
    cases.append(gen_case("surrogate.pair_is_valid", with_(prompt="a \ud83d\ude00 b"), expect="2xx"))
    # 4. the body itself
    deep = b'{"prompt": "x", "scheduler_config": ' + b'{"a": ' * 10000 + b"1" + b"}" * 10000 + b"}"
    five_mb = jbody({"prompt": "x" * (5 * 1024 * 1024)})
    body_cases = [
        ("body.unknown_field", jbody(with_(colour="red")), [JSON_CT], "4xx"),
        ("body.unknown_fields_many", jbody(with_(**{f"f{i}": i for i in range(200)})), [JSON_CT], "4xx"),
        ("body.empty", b"", [JSON_CT], "4xx"),
        ("body.whitespace", b"  \r\n\t ", [JSON_CT], "4xx"),
        ("body.not_json", b"prompt=a red circle", [JSON_CT], "4xx"),
        ("body.truncated_json", b'{"prompt": "a', [JSON_CT], "4xx"),
        ("body.json_array", b'[{"prompt": "x"}]', [JSON_CT], "4xx"),
        ("body.json_string", b'"a red circle"', [JSON_CT], "4xx"),
        ("body.json_null", b"null", [JSON_CT], "4xx"),
        ("body.json_number", b"42", [JSON_CT], "4xx"),
        ("body.nested_10k_levels", b'{"prompt": "x", "a": ' + b"[" * 10000 + b"]" * 10000 + b"}", [JSON_CT], "4xx"),
        ("body.nested_10k_objects_in_scheduler", deep, [JSON_CT], "4xx"),
        ("body.nested_17_levels", b'{"prompt": "x", "sigmas": ' + b"[" * 17 + b"]" * 17 + b"}", [JSON_CT], "4xx"),
        ("body.invalid_utf8", b'{"prompt": "\xff\xfe"}', [JSON_CT], "4xx"),
        ("body.utf8_bom", b"\xef\xbb\xbf" + jbody(GEN), [JSON_CT], "2xx"),
        ("body.utf16_encoded", json.dumps(GEN).encode("utf-16"), [JSON_CT], "4xx"),
        ("body.duplicate_keys", b'{"prompt": "a", "prompt": "b", "steps": 1, "size": "128x128"}', [JSON_CT], None),
        ("body.trailing_garbage", jbody(GEN) + b" xyz", [JSON_CT], "4xx"),
        ("body.two_objects", jbody(GEN) + jbody(GEN), [JSON_CT], "4xx"),
        ("body.nul_bytes", b"\0" * 100, [JSON_CT], "4xx"),
        ("body.900kb_field", jbody(with_(user="u" * 900_000)), [JSON_CT], "4xx"),
        ("body.5mb_content_length", five_mb, [JSON_CT], "413"),
        ("body.content_length_lies_short", jbody(GEN), [JSON_CT, ("Content-Length", "10")], "4xx"),
        ("body.content_length_negative", jbody(GEN), [JSON_CT, ("Content-Length", "-1")], "4xx"),
        ("body.content_length_not_a_number", jbody(GEN), [JSON_CT, ("Content-Length", "abc")], "4xx"),
        ("body.content_length_huge", jbody(GEN), [JSON_CT, ("Content-Length", "99999999999999999999")], "4xx"),
        ("body.content_length_and_chunked", None, None, None),
        ("ctype.none", jbody(GEN), [], None),
        ("ctype.text_plain", jbody(GEN), [("Content-Type", "text/plain")], None),
        ("ctype.form_urlencoded", b"prompt=a+red+circle&steps=1", [("Content-Type", "application/x-www-form-urlencoded")],
         "4xx"),
        ("ctype.multipart_form", None, None, "4xx"),
        ("ctype.multipart_no_boundary", jbody(GEN), [("Content-Type", "multipart/form-data")], "4xx"),
        ("ctype.json_charset_utf16", jbody(GEN), [("Content-Type", "application/json; charset=utf-16")], None),
        ("ctype.garbage", jbody(GEN), [("Content-Type", "\x01\x02;;;=")], None),
        ("ctype.huge_header_value", jbody(GEN), [("Content-Type", "application/json;" + "a" * 100_000)], None),
        ("prefer.async_with_invalid_body", jbody(with_(n=0)), [JSON_CT, ("Prefer", "respond-async")], "4xx"),
        ("prefer.garbage_value", jbody(GEN), [JSON_CT, ("Prefer", "respond-async;;;\x01, wait=-1")], None),
    ]
    for name, body, headers, expect in body_cases:
        if name == "body.content_length_and_chunked":
            data = jbody(GEN)
            raw = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
            cases.append(Case(f"gen.{name}", "POST", "/v1/images/generations", raw=raw, expect=expect,
                              group="generations"))
            continue
        if name == "ctype.multipart_form":
            data, ctype = multipart([("prompt", "x", None, None), ("image", image_bytes(), "a.png", "image/png")])
            body, headers = data, [("Content-Type", ctype)]
        cases.append(Case(f"gen.{name}", "POST", "/v1/images/generations", headers, body, expect, group="generations"))
    cases.append(Case("gen.body.5mb_chunked_no_length", "POST", "/v1/images/generations", [JSON_CT], five_mb, "413",
                      chunked=True, group="generations"))
    cases.append(Case("gen.body.expect_100_continue_5mb", "POST", "/v1/images/generations",
                      [JSON_CT, ("Expect", "100-continue")], five_mb, "413", group="generations"))
    cases.append(Case("gen.body.json_depth_bomb_5mb", "POST", "/v1/images/generations", [JSON_CT],
                      b"[" * (5 * 1024 * 1024), "413", group="generations"))
    return cases


EDIT_FIELDS = [("prompt", "add a blue square"), ("size", "128x128"), ("steps", "1"), ("seed", "3")]


def form_case(route, name, parts, expect="4xx", *, fields=True, headers=(), raw_body=None, **kw) -> Case:
    base = EDIT_FIELDS if route == "edits" else [("layers", "2"), ("steps", "1"), ("seed", "3")]
    allparts = ([(k, v, None, None) for k, v in base] if fields else []) + list(parts)
    data, ctype = multipart(allparts)
    if raw_body is not None:
        data = raw_body
    return Case(f"{route}.{name}", "POST", f"/v1/images/{route}", [("Content-Type", ctype), *headers], data, expect,
                group=route, **kw)


def replace_field(route, name, key, value, expect="4xx") -> Case:
    base = EDIT_FIELDS if route == "edits" else [("layers", "2"), ("steps", "1"), ("seed", "3")]
    parts = [(k, value if k == key else v, None, None) for k, v in base]
    if key not in dict(base):
        parts.append((key, value, None, None))
    img = image_bytes()
    parts.append(("image", img, "a.png", "image/png"))
    data, ctype = multipart(parts)
    return Case(f"{route}.{name}", "POST", f"/v1/images/{route}", [("Content-Type", ctype)], data, expect, group=route)


def upload_cases(route: str, images: dict) -> list[Case]:
    png = images["png"]
    img = lambda data, filename="a.png", ctype="image/png", name="image": (name, data, filename, ctype)
    cases = [
        form_case(route, "upload.no_image", []),
        form_case(route, "upload.empty_image", [img(b"")]),
        form_case(route, "upload.truncated_png", [img(png[: len(png) // 2])]),
        form_case(route, "upload.png_signature_only", [img(png[:8])]),
        form_case(route, "upload.text_named_png", [img(b"hello, I am not a picture\n" * 20)]),
        form_case(route, "upload.html_named_png", [img(b"<html><script>alert(1)</script></html>", "x.png", "text/html")]),
        form_case(route, "upload.gif", [img(images["gif"], "a.gif", "image/gif")]),
        form_case(route, "upload.bmp", [img(images["bmp"], "a.bmp", "image/bmp")]),
        form_case(route, "upload.tiff", [img(images["tiff"], "a.tiff", "image/tiff")]),
        form_case(route, "upload.ico", [img(images["ico"], "a.ico", "image/x-icon")]),
        form_case(route, "upload.svg", [img(b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
                                            "a.svg", "image/svg+xml")]),
        form_case(route, "upload.png_bomb_1bit_20000x20000", [img(images["bomb"])]),
        form_case(route, "upload.png_header_65535x65535", [img(png_header_only(65535, 65535, 8, 2))]),
        form_case(route, "upload.png_header_4097x4097_over_pixels", [img(png_header_only(4097, 4097, 8, 2))]),
        form_case(route, "upload.png_header_0x0", [img(png_header_only(0, 0))]),
        form_case(route, "upload.png_bad_crc", [img(png[:20] + b"\0\0\0\0" + png[24:])]),
        form_case(route, "upload.40mb_file", [img(images["big40"])], expect="4xx"),
        form_case(route, "upload.jpeg_valid", [img(images["jpeg"], "a.jpg", "image/jpeg")], expect="2xx"),
        form_case(route, "upload.webp_valid", [img(images["webp"], "a.webp", "image/webp")], expect="2xx"),
        form_case(route, "upload.webp_animated", [img(images["webp_anim"], "a.webp", "image/webp")], expect=None),
        form_case(route, "upload.png_16bit_gray", [img(images["png_i16"])], expect=None),
        form_case(route, "upload.png_la", [img(images["png_la"])], expect="2xx"),
        form_case(route, "upload.png_palette_trns", [img(images["png_p"])], expect="2xx"),
        form_case(route, "upload.png_1bit_small", [img(images["png_1"])], expect="2xx"),
        form_case(route, "upload.jpeg_cmyk", [img(images["jpeg_cmyk"], "a.jpg", "image/jpeg")], expect=None),
        form_case(route, "upload.jpeg_exif_rotated", [img(images["jpeg_exif"], "a.jpg", "image/jpeg")], expect="2xx"),
        form_case(route, "upload.png_1x1", [img(images["png_1x1"])], expect=None),
        form_case(route, "upload.png_4096x1_extreme_aspect", [img(images["png_wide"])], expect=None),
        form_case(route, "upload.png_ctype_text_plain", [img(png, "a.txt", "text/plain")], expect="2xx"),
        form_case(route, "upload.filename_traversal", [img(png, "../../../../etc/passwd.png")], expect="2xx"),
        form_case(route, "upload.filename_crlf_and_quotes", [img(png, 'a"\r\nX-Evil: 1\r\n.png')], expect=None),
        form_case(route, "upload.filename_surrogate_bytes", [img(png, b"\xed\xa0\x80.png")], expect=None),
        form_case(route, "upload.image_as_text_field", [("image", "not a file", None, None)]),
        form_case(route, "upload.file_in_prompt_field", [img(png), ("prompt", png, "p.png", "image/png")],
                  fields=False),
        form_case(route, "upload.unknown_file_field", [img(png), ("extra", png, "e.png", "image/png")]),
        form_case(route, "field.300kb_prompt", [("prompt", "p" * 300_000, None, None), img(png)], fields=False),
        form_case(route, "field.unknown", [img(png), ("colour", "red", None, None)]),
        form_case(route, "field.invalid_utf8_prompt", [("prompt", b"\xff\xfe bad", None, None), img(png)],
                  fields=False, expect=None),
        form_case(route, "field.nul_in_field_name", [img(png), ("pro\x00mpt", "x", None, None)]),
        form_case(route, "field.empty_field_name", [img(png), ("", "x", None, None)]),
        form_case(route, "form.empty_multipart", [], fields=False),
        form_case(route, "form.no_closing_boundary", [], raw_body=b"--xyz\r\nContent-Disposition: form-data; "
                                                                   b'name="prompt"\r\n\r\nhello'),
        form_case(route, "form.garbage_body", [], raw_body=os.urandom(4096)),
        form_case(route, "form.65_fields", [img(png)] + [(f"f{i}", "x", None, None) for i in range(65)]),
        Case(f"{route}.form.boundary_missing", "POST", f"/v1/images/{route}",
             [("Content-Type", "multipart/form-data")], b"--x\r\n\r\n--x--\r\n", "4xx", group=route),
        Case(f"{route}.form.boundary_200_chars", "POST", f"/v1/images/{route}",
             [("Content-Type", "multipart/form-data; boundary=" + "b" * 200)], b"--" + b"b" * 200 + b"--\r\n", "4xx",
             group=route),
        Case(f"{route}.ctype.json", "POST", f"/v1/images/{route}", [JSON_CT], jbody({"prompt": "x"}), "4xx",
             group=route),
        Case(f"{route}.ctype.none", "POST", f"/v1/images/{route}", [], b"prompt=x", "4xx", group=route),
        Case(f"{route}.ctype.form_urlencoded", "POST", f"/v1/images/{route}",
             [("Content-Type", "application/x-www-form-urlencoded")], b"prompt=x&image=abc", "4xx", group=route),
        Case(f"{route}.ctype.text_plain", "POST", f"/v1/images/{route}", [("Content-Type", "text/plain")], b"x",
             "4xx", group=route),
        Case(f"{route}.body.empty_multipart_ctype", "POST", f"/v1/images/{route}",
             [("Content-Type", "multipart/form-data; boundary=x")], b"", "4xx", group=route),
    ]
    return cases


def edit_cases(images: dict) -> list[Case]:
    png = images["png"]
    img = ("image", png, "a.png", "image/png")
    cases = upload_cases("edits", images)
    cases += [
        form_case("edits", "valid_one_image", [img], expect="2xx"),
        form_case("edits", "image[]_naming", [("image[]", png, "a.png", "image/png")], expect="2xx"),
        form_case("edits", "10_images_max", [img] * 10, expect="2xx"),
        form_case("edits", "11_images", [img] * 11),
        form_case("edits", "mask_part", [img, ("mask", png, "m.png", "image/png")]),
        form_case("edits", "mask_only", [("mask", png, "m.png", "image/png")]),
        form_case("edits", "duplicate_prompt", [img, ("prompt", "again", None, None)]),
        form_case("edits", "duplicate_steps", [img, ("steps", "2", None, None)]),
        form_case("edits", "image_exactly_32mib", [("image", images["pad32"], "a.png", "image/png")], expect="2xx"),
        form_case("edits", "image_32mib_plus_1", [("image", images["pad32"] + b"\0", "a.png", "image/png")]),
        form_case("edits", "two_bombs", [("image", images["bomb"], "a.png", "image/png")] * 2),
        form_case("edits", "size_auto_from_1x4096", [("prompt", "x", None, None), ("steps", "1", None, None),
                                                      ("image", images["png_tall"], "a.png", "image/png")],
                  expect=None, fields=False),
    ]
    for key, value, expect in [("n", "abc", "4xx"), ("n", "true", "4xx"), ("n", "0", "4xx"), ("n", "11", "4xx"),
                               ("steps", "1.5", "4xx"), ("steps", "0", "4xx"), ("steps", "1001", "4xx"),
                               ("seed", "-1", "4xx"), ("seed", str(2**63), "4xx"), ("seed", "9" * 5000, "4xx"),
                               ("size", "0x0", "4xx"), ("size", "64x", "4xx"), ("size", "99999x99999", "4xx"),
                               ("guidance_scale", "NaN", "4xx"), ("guidance_scale", "-1", "4xx"),
                               ("guidance_scale", "inf", "4xx"), ("stream", "maybe", "4xx"),
                               ("loras", "not json", "4xx"), ("loras", "[" * 50_000, "4xx"),
                               ("loras", json.dumps([{"name": "\udfff"}]), "4xx"),
                               ("sigmas", "[0.5]", "4xx"), ("scheduler_config", "{}", "4xx"),
                               ("prompt", "", "4xx"), ("prompt", "x" * 32001, "4xx"),
                               ("response_format", "gif", "4xx"), ("input_fidelity", "high", "2xx"),
                               ("model", "qimg-tiny-layered", "4xx"), ("model", "nope", "4xx")]:
        label = value if len(value) <= 12 else f"{value[:6]}..{len(value)}chars"
        label = re.sub(r"[^A-Za-z0-9_.\-\[\]{}]", "_", label)
        cases.append(replace_field("edits", f"field.{key}={label}", key, value, expect))
    # a prompt field with the JSON-escaped surrogate is plain text in a form: no surrogate exists, it is accepted
    return cases


def layers_cases(images: dict) -> list[Case]:
    png = images["png_rgba"]
    img = ("image", png, "a.png", "image/png")
    cases = upload_cases("layers", images)
    cases += [
        form_case("layers", "valid", [img], expect="2xx"),
        form_case("layers", "two_images", [img, img]),
        form_case("layers", "mask_part", [img, ("mask", png, "m.png", "image/png")]),
        form_case("layers", "duplicate_layers", [img, ("layers", "3", None, None)]),
    ]
    for key, value, expect in [("layers", "0", "4xx"), ("layers", "1", "4xx"), ("layers", "-1", "4xx"),
                               ("layers", "10", None), ("layers", "11", "4xx"), ("layers", "16", "4xx"),
                               ("layers", "17", "4xx"), ("layers", "x", "4xx"), ("layers", str(2**64), "4xx"),
                               ("resolution", "31", "4xx"), ("resolution", "100", "4xx"),
                               ("resolution", "4097", "4xx"), ("resolution", "x", "4xx"),
                               ("resolution", "4096", "4xx"),
                               ("recurse", "2", "4xx"), ("recurse", "-1", "4xx"), ("recurse", "x", "4xx"),
                               ("format", "gif", "4xx"), ("format", "psd", None), ("caption_language", "fr", "4xx"),
                               ("steps", "0", "4xx"), ("steps", "1001", "4xx"), ("seed", "-1", "4xx"),
                               ("model", "qimg-tiny", "4xx"), ("model", "nope", "4xx"), ("prompt", "x" * 32001, "4xx"),
                               ("guidance_scale", "101", "4xx"), ("n", "2", "4xx")]:
        cases.append(replace_field("layers", f"field.{key}={value}", key, value, expect))
    return cases


def export_cases(ctx) -> list[Case]:
    out, jpg, inp = ctx["output_file"], ctx["jpeg_file"], ctx["input_file"]
    layers = ctx.get("layer_files") or [out]
    ghost = "file_" + "0" * 32
    specs = [
        ("valid_zip", {"layers": layers, "format": "zip"}, "2xx"),
        ("valid_psd", {"layers": layers, "format": "psd"}, None),
        ("valid_ora_output_png", {"layers": [out], "format": "ora"}, None),
        ("empty_layers", {"layers": [], "format": "zip"}, "4xx"),
        ("65_layers", {"layers": [out] * 65, "format": "zip"}, "4xx"),
        ("64_layers_max", {"layers": [out] * 64, "format": "zip"}, None),
        ("unknown_file", {"layers": [ghost], "format": "zip"}, "4xx"),
        ("traversal", {"layers": ["../../etc/passwd"], "format": "zip"}, "4xx"),
        ("traversal_urlenc", {"layers": ["..%2F..%2Fetc%2Fpasswd"], "format": "zip"}, "4xx"),
        ("file_id_with_ext", {"layers": [out + ".png"], "format": "zip"}, "4xx"),
        ("input_role_file", {"layers": [inp], "format": "zip"}, "4xx"),
        ("jpeg_output", {"layers": [jpg], "format": "zip"}, "4xx"),
        ("format_gif", {"layers": [out], "format": "gif"}, "4xx"),
        ("format_missing", {"layers": [out]}, "4xx"),
        ("format_json", {"layers": [out], "format": "json"}, "4xx"),
        ("names_mismatch", {"layers": [out], "format": "zip", "names": ["a", "b"]}, "4xx"),
        ("names_201_chars", {"layers": [out], "format": "zip", "names": ["n" * 201]}, "4xx"),
        ("names_traversal", {"layers": [out], "format": "zip", "names": ["../../evil"]}, None),
        ("names_surrogate", {"layers": [out], "format": "zip", "names": ["\ud800"]}, "4xx"),
        ("names_control_chars", {"layers": [out], "format": "psd", "names": ["\x00\x1b\r\n"]}, None),
        ("layers_string", {"layers": out, "format": "zip"}, "4xx"),
        ("layers_ints", {"layers": [1, 2], "format": "zip"}, "4xx"),
        ("layers_null", {"layers": None, "format": "zip"}, "4xx"),
        ("layers_objects", {"layers": [{"id": out}], "format": "zip"}, "4xx"),
        ("unknown_field", {"layers": [out], "format": "zip", "x": 1}, "4xx"),
        ("surrogate_layer_id", {"layers": ["file_\ud800"], "format": "zip"}, "4xx"),
    ]
    cases = [Case(f"export.{n}", "POST", "/v1/images/layers/export", [JSON_CT], jbody(b), e, group="export")
             for n, b, e in specs]
    cases += [
        Case("export.body.empty", "POST", "/v1/images/layers/export", [JSON_CT], b"", "4xx", group="export"),
        Case("export.body.array", "POST", "/v1/images/layers/export", [JSON_CT], b"[]", "4xx", group="export"),
        Case("export.body.nested_10k", "POST", "/v1/images/layers/export", [JSON_CT],
             b'{"layers": ' + b"[" * 10000 + b"]" * 10000 + b"}", "4xx", group="export"),
        Case("export.ctype.multipart", "POST", "/v1/images/layers/export",
             [("Content-Type", "multipart/form-data; boundary=x")], b"--x--\r\n", "4xx", group="export"),
        Case("export.method.get", "GET", "/v1/images/layers/export", [], None, "405", group="export"),
    ]
    return cases


def resource_cases(ctx) -> list[Case]:
    job, done, out = ctx["job_id"], ctx["job_id"], ctx["output_file"]
    ghost_job, ghost_file = "job_" + "0" * 32, "file_" + "0" * 32
    g = lambda name, method, path, expect, headers=(), body=None: Case(
        name, method, path, list(headers), body, expect, group=name.split(".")[0])
    return [
        # jobs
        g("jobs.list", "GET", "/v1/jobs", "200"),
        g("jobs.list.limit_0", "GET", "/v1/jobs?limit=0", "4xx"),
        g("jobs.list.limit_200_max", "GET", "/v1/jobs?limit=200", "200"),
        g("jobs.list.limit_201", "GET", "/v1/jobs?limit=201", "4xx"),
        g("jobs.list.limit_-1", "GET", "/v1/jobs?limit=-1", "4xx"),
        g("jobs.list.limit_abc", "GET", "/v1/jobs?limit=abc", "4xx"),
        g("jobs.list.limit_float", "GET", "/v1/jobs?limit=1.5", "4xx"),
        g("jobs.list.limit_huge", "GET", "/v1/jobs?limit=" + "9" * 5000, "4xx"),
        g("jobs.list.limit_twice", "GET", "/v1/jobs?limit=1&limit=2", None),
        g("jobs.list.before_garbage", "GET", "/v1/jobs?before=abc", "4xx"),
        g("jobs.list.before_traversal", "GET", "/v1/jobs?before=..%2F..%2Fetc%2Fpasswd", "4xx"),
        g("jobs.list.before_unknown_id", "GET", f"/v1/jobs?before={ghost_job}", "200"),
        g("jobs.list.before_sql", "GET", "/v1/jobs?before=job_'%20OR%201=1--", "4xx"),
        g("jobs.list.query_surrogate_bytes", "GET", "/v1/jobs?before=%ED%A0%80", "4xx"),
        g("jobs.list.query_nul", "GET", "/v1/jobs?before=%00", "4xx"),
        g("jobs.get.valid", "GET", f"/v1/jobs/{job}", "200"),
        g("jobs.get.invalid_id", "GET", "/v1/jobs/abc", "400"),
        g("jobs.get.unknown_id", "GET", f"/v1/jobs/{ghost_job}", "404"),
        g("jobs.get.uppercase_id", "GET", f"/v1/jobs/{job.upper()}", "400"),
        g("jobs.get.traversal", "GET", "/v1/jobs/../../etc/passwd", "404"),
        g("jobs.get.traversal_urlenc", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", "4xx"),
        g("jobs.get.traversal_dotdot", "GET", "/v1/jobs/..", "4xx"),
        g("jobs.get.nul", "GET", "/v1/jobs/%00", "400"),
        g("jobs.get.surrogate_bytes", "GET", "/v1/jobs/%ED%A0%80", "400"),
        g("jobs.get.10k_id", "GET", "/v1/jobs/" + "a" * 10000, "400"),
        g("jobs.get.sql", "GET", "/v1/jobs/job_'%20OR%20'1'='1", "400"),
        g("jobs.get.trailing_slash", "GET", f"/v1/jobs/{job}/", None),
        g("jobs.events.invalid_id", "GET", "/v1/jobs/abc/events", "400"),
        g("jobs.events.unknown_id", "GET", f"/v1/jobs/{ghost_job}/events", "404"),
        g("jobs.events.finished_job", "GET", f"/v1/jobs/{done}/events", "200"),
        g("jobs.delete.invalid_id", "DELETE", "/v1/jobs/abc", "400"),
        g("jobs.delete.unknown_id", "DELETE", f"/v1/jobs/{ghost_job}", "404"),
        g("jobs.delete.finished_job", "DELETE", f"/v1/jobs/{done}", "409"),
        g("jobs.delete.with_body", "DELETE", f"/v1/jobs/{done}", "409", [JSON_CT], b'{"x": 1}'),
        g("jobs.delete.collection", "DELETE", "/v1/jobs", "405"),
        g("jobs.post.collection", "POST", "/v1/jobs", "405", [JSON_CT], b"{}"),
        g("jobs.put.job", "PUT", f"/v1/jobs/{job}", "405", [JSON_CT], b"{}"),
        g("jobs.patch.job", "PATCH", f"/v1/jobs/{job}", "405", [JSON_CT], b"{}"),
        g("jobs.head.list", "HEAD", "/v1/jobs", None),
        g("jobs.head.job", "HEAD", f"/v1/jobs/{job}", None),
        g("jobs.method.custom_FOO", "FOO", "/v1/jobs", "405"),
        # files
        g("files.get.valid", "GET", f"/v1/files/{out}", "200"),
        g("files.get.valid_with_png_ext", "GET", f"/v1/files/{out}.png", "200"),
        g("files.get.valid_with_exe_ext", "GET", f"/v1/files/{out}.exe", None),
        g("files.get.download_true", "GET", f"/v1/files/{out}?download=true", "200"),
        g("files.get.download_garbage", "GET", f"/v1/files/{out}?download=maybe", "4xx"),
        g("files.get.unknown", "GET", f"/v1/files/{ghost_file}", "404"),
        g("files.get.invalid", "GET", "/v1/files/abc", "400"),
        g("files.get.traversal", "GET", "/v1/files/../../etc/passwd", "404"),
        g("files.get.traversal_urlenc", "GET", "/v1/files/..%2F..%2Fetc%2Fpasswd", "4xx"),
        g("files.get.traversal_double_urlenc", "GET", "/v1/files/..%252F..%252Fetc%252Fpasswd", "4xx"),
        g("files.get.traversal_backslash", "GET", "/v1/files/..%5C..%5Cetc%5Cpasswd", "4xx"),
        g("files.get.dotfile_lock", "GET", "/v1/files/.lock", "4xx"),
        g("files.get.sqlite_db", "GET", "/v1/files/..%2Fjobs.sqlite3", "4xx"),
        g("files.get.nul", "GET", "/v1/files/%00", "4xx"),
        g("files.get.id_nul_ext", "GET", f"/v1/files/{out}%00.png", "4xx"),
        g("files.get.surrogate_bytes", "GET", "/v1/files/%ED%A0%80", "4xx"),
        g("files.get.10k_id", "GET", "/v1/files/" + "f" * 10000, "4xx"),
        g("files.range.first_10", "GET", f"/v1/files/{out}", "206", [("Range", "bytes=0-9")]),
        g("files.range.suffix", "GET", f"/v1/files/{out}", "206", [("Range", "bytes=-5")]),
        g("files.range.past_end", "GET", f"/v1/files/{out}", "416", [("Range", "bytes=100000000-100000010")]),
        g("files.range.reversed", "GET", f"/v1/files/{out}", None, [("Range", "bytes=10-5")]),
        g("files.range.multi", "GET", f"/v1/files/{out}", None, [("Range", "bytes=0-1,5-9")]),
        g("files.range.1000_ranges", "GET", f"/v1/files/{out}", None,
          [("Range", "bytes=" + ",".join(f"{i}-{i}" for i in range(1000)))]),
        g("files.range.garbage", "GET", f"/v1/files/{out}", None, [("Range", "bytes=abc")]),
        g("files.range.other_unit", "GET", f"/v1/files/{out}", None, [("Range", "items=0-1")]),
        g("files.range.huge_numbers", "GET", f"/v1/files/{out}", None, [("Range", "bytes=0-" + "9" * 5000)]),
        g("files.head.valid", "HEAD", f"/v1/files/{out}", "200"),
        g("files.head.invalid", "HEAD", "/v1/files/abc", "400"),
        g("files.head.unknown", "HEAD", f"/v1/files/{ghost_file}", "404"),
        g("files.if_none_match", "GET", f"/v1/files/{out}", None, [("If-None-Match", "*")]),
        g("files.delete", "DELETE", f"/v1/files/{out}", "405"),
        g("files.post", "POST", "/v1/files", "4xx", [JSON_CT], b"{}"),
        g("files.list", "GET", "/v1/files", "404"),
        # models
        g("models.list", "GET", "/v1/models", "200"),
        g("models.get.tiny", "GET", "/v1/models/qimg-tiny", "200"),
        g("models.get.unknown", "GET", "/v1/models/nope", "404"),
        g("models.get.empty_name", "GET", "/v1/models/", "404"),
        g("models.get.traversal", "GET", "/v1/models/../../etc/passwd", "404"),
        g("models.get.traversal_urlenc", "GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", "404"),
        g("models.get.nested_path", "GET", "/v1/models/a/b/c", "404"),
        g("models.get.surrogate_bytes", "GET", "/v1/models/%ED%A0%80", "404"),
        g("models.get.nul", "GET", "/v1/models/%00", "404"),
        g("models.get.10k_name", "GET", "/v1/models/" + "m" * 10000, "404"),
        g("models.post", "POST", "/v1/models", "405", [JSON_CT], b"{}"),
        g("models.delete", "DELETE", "/v1/models/qimg-tiny", "405"),
        g("loras.list", "GET", "/v1/loras", "200"),
        # health and the rest
        g("health.get", "GET", "/health", "200"),
        g("health.query", "GET", "/health?x=1&y=" + "z" * 4000, "200"),
        g("health.post", "POST", "/health", "405", [JSON_CT], b"{}"),
        g("health.head", "HEAD", "/health", None),
        g("health.options", "OPTIONS", "/health", None),
        g("misc.trace", "TRACE", "/", "405"),
        g("misc.unknown_route", "GET", "/v1/nope", "404"),
        g("misc.unknown_route_post", "POST", "/v1/images/nope", "404", [JSON_CT], b"{}"),
        g("misc.images_root", "GET", "/v1/images", "404"),
        g("misc.get_generations", "GET", "/v1/images/generations", "405"),
        g("misc.get_edits", "GET", "/v1/images/edits", "405"),
        g("misc.put_generations", "PUT", "/v1/images/generations", "405", [JSON_CT], jbody(GEN)),
        g("misc.delete_layers", "DELETE", "/v1/images/layers", "405"),
        g("misc.head_generations", "HEAD", "/v1/images/generations", None),
        g("misc.options_generations", "OPTIONS", "/v1/images/generations", None),
        g("misc.double_slash", "GET", "//v1/jobs", None),
        g("misc.absolute_uri", "GET", f"http://evil.example/v1/jobs/{job}", None),
        g("misc.static_traversal", "GET", "/static/../../../../etc/passwd", "404"),
        g("misc.static_traversal_urlenc", "GET", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "404"),
        g("misc.openapi", "GET", "/openapi.json", "200"),
        g("misc.page", "GET", "/", "200"),
    ]


def protocol_cases() -> list[Case]:
    """Requests the HTTP parser (h11, in uvicorn) refuses before the app sees them: no app-made JSON is possible."""
    raw = [
        ("garbage_request_line", b"GARBAGE\r\n\r\n"),
        ("binary_junk", os.urandom(512) + b"\r\n\r\n"),
        ("http_0.9", b"GET /health\r\n\r\n"),
        ("http_2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("no_host_http11", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
        ("http_1.0", b"GET /health HTTP/1.0\r\n\r\n"),
        ("header_100kb", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 100_000
         + b"\r\n\r\n"),
        ("header_no_colon", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nbroken header\r\n\r\n"),
        ("header_nul", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-A: a\0b\r\n\r\n"),
        ("lf_only_line_endings", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n"),
        ("1000_headers", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
         + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"\r\n"),
        ("bad_chunk_size", (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")),
        ("pipelined_two_requests", (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/nope HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")),
        ("space_in_path", b"GET /v1/jobs/a b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("url_64kb", b"GET /v1/jobs/" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ]
    return [Case(f"protocol.{n}", raw=r, expect="4xx" if n not in ("http_1.0", "pipelined_two_requests",
                                                                    "lf_only_line_endings", "header_100kb",
                                                                    "1000_headers") else None,
                 group="protocol") for n, r in raw]


def auth_cases() -> list[Case]:
    gen = jbody(GEN)
    c = lambda name, headers, expect, method="GET", path="/v1/jobs", body=None: Case(
        f"auth.{name}", method, path, list(headers), body, expect, server="auth", group="auth")
    return [
        c("no_header", [], "401"),
        c("bearer_empty", [("Authorization", "Bearer")], "401"),
        c("bearer_space", [("Authorization", "Bearer ")], "401"),
        c("wrong_key", [("Authorization", "Bearer wrong")], "401"),
        c("key_prefix", [("Authorization", f"Bearer {API_KEY[:-1]}")], "401"),
        c("key_plus_suffix", [("Authorization", f"Bearer {API_KEY}x")], "401"),
        c("basic_scheme", [("Authorization", "Basic " + base64.b64encode(f"u:{API_KEY}".encode()).decode())], "401"),
        c("key_without_scheme", [("Authorization", API_KEY)], "401"),
        c("token_scheme", [("Authorization", f"Token {API_KEY}")], "401"),
        c("two_keys_in_one_header", [("Authorization", f"Bearer {API_KEY}, Bearer x")], "401"),
        c("non_latin1_bytes", [("Authorization", b"Bearer \xff\xfe\x80")], "401"),
        c("10kb_token", [("Authorization", "Bearer " + "k" * 10_000)], "401"),
        c("nul_in_token", [("Authorization", b"Bearer a\x00b")], "4xx"),
        c("key_in_query", [], "401", path=f"/v1/jobs?api_key={API_KEY}"),
        c("key_in_x_api_key", [("X-Api-Key", API_KEY)], "401"),
        c("no_key_post_generation", [JSON_CT], "401", "POST", "/v1/images/generations", gen),
        c("no_key_5mb_body", [JSON_CT], "401", "POST", "/v1/images/generations", b"x" * (5 * 2**20)),
        c("no_key_file", [], "401", path="/v1/files/file_" + "0" * 32),
        c("no_key_models", [], "401", path="/v1/models"),
        c("no_key_health_public", [], "200", path="/health"),
        c("wrong_key_head", [("Authorization", "Bearer wrong")], None, "HEAD", "/v1/files/file_" + "0" * 32),
        c("valid_key", [("Authorization", f"Bearer {API_KEY}")], "200"),
        c("valid_key_lowercase_scheme", [("Authorization", f"bearer {API_KEY}")], "200"),
        c("valid_key_extra_spaces", [("Authorization", f"Bearer   {API_KEY}  ")], None),
        c("two_authorization_headers", [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {API_KEY}")],
          None),
        c("valid_key_bad_body", [("Authorization", f"Bearer {API_KEY}"), JSON_CT], "400", "POST",
          "/v1/images/generations", b"[]"),
    ]


# -- custom cases ------------------------------------------------------------------------------------------------
def case_disconnect_mid_body(ctx, path="/v1/images/generations", ctype="application/json"):
    port = ctx["port"]
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: 1000000\r\n\r\n".encode()
              + b'{"prompt":')
    time.sleep(0.2)
    s.close()
    r = Resp(elapsed=time.perf_counter() - start, error="client closed after 10 of 1,000,000 body bytes")
    return r, "no answer expected; the server must stay healthy"


def case_disconnect_during_job(ctx):
    """A synchronous generation whose client goes away while the job runs: the job must end up cancelled."""
    port = ctx["port"]
    body = jbody(with_(steps=1000, seed=424242))
    head, pieces = build_request(port, "POST", "/v1/images/generations", [JSON_CT], body)
    start = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(head + b"".join(pieces))
    time.sleep(1.5)
    s.close()
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        jobs = (exchange(port, "GET", "/v1/jobs?limit=20").json() or {}).get("data", [])
        mine = [j for j in jobs if j.get("params", {}).get("seed") == 424242]
        status = mine[0]["status"] if mine else None
        if status in ("cancelled", "failed", "succeeded"):
            break
        time.sleep(0.2)
    r = Resp(status=None, elapsed=time.perf_counter() - start, error=f"client closed; job status {status}")
    r.ok_override = status == "cancelled"
    return r, f"the job ended {status!r} (want 'cancelled')"


def case_slowloris(ctx):
    """20 connections send a partial request head and hold it open 5 s; meanwhile /health and a generation run."""
    port = ctx["port"]
    socks = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Ty")
        socks.append(s)
    slow_body = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow_body.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\":")
    socks.append(slow_body)
    start = time.perf_counter()
    worst_health, gen = 0.0, None
    try:
        while time.perf_counter() - start < 5.0:
            h = exchange(port, "GET", "/health", timeout=HEALTH_S)
            worst_health = max(worst_health, h.elapsed if h.status == 200 else 99.0)
            if gen is None:
                gen = exchange(port, "POST", "/v1/images/generations", [JSON_CT], jbody(with_(seed=99)))
            time.sleep(0.25)
    finally:
        for s in socks:
            s.close()
    r = Resp(status=gen.status if gen else None, elapsed=time.perf_counter() - start, body=gen.body if gen else b"",
             headers=gen.headers if gen else {})
    r.ok_override = bool(gen and gen.status == 200 and worst_health < HEALTH_S)
    return r, (f"21 half-open connections held 5 s; meanwhile /health worst {worst_health * 1000:.0f} ms, "
               f"a generation answered {gen.status if gen else None} in {gen.elapsed * 1000 if gen else 0:.0f} ms")


def case_queue_full(ctx):
    """17 async jobs of 1000 steps against --max-queue 16: the 17th (or so) gets 429 with Retry-After; all cancelled."""
    port = ctx["port"]
    ids, answer = [], None
    for i in range(20):
        r = exchange(port, "POST", "/v1/images/generations", [JSON_CT, ("Prefer", "respond-async")],
                     jbody(with_(steps=1000, seed=5000 + i)))
        if r.status == 202:
            ids.append(r.headers.get("x-qimg-job-id"))
        else:
            answer = r
            break
    for job_id in ids:
        exchange(port, "DELETE", f"/v1/jobs/{job_id}")
    if answer is None:
        answer = Resp(error="no 429 after 20 jobs")
    return answer, f"{len(ids)} accepted before the answer; retry-after {answer.headers.get('retry-after')}; all cancelled"


def case_nan_job(ctx, prefer_async=False):
    """A generation whose scheduler_config carries NaN (JSON's NaN literal): if it is accepted, its job must still
    read back (GET /v1/jobs/{id} and the list)."""
    port = ctx["port"]
    headers = [JSON_CT] + ([("Prefer", "respond-async")] if prefer_async else [])
    post = exchange(port, "POST", "/v1/images/generations", headers,
                    jbody(with_(seed=777 + prefer_async, scheduler_config={"shift": float("nan")})))
    job_id = post.headers.get("x-qimg-job-id")
    if prefer_async:
        note = f"POST (Prefer: respond-async) -> {post.status}, job {job_id}"
        if job_id is None and "data" in ctx:
            rows = stored_jobs(ctx["data"])
            nan = [r for r in rows if r["seed"] == 778]
            if nan:
                note += f"; yet the job was created: {nan[-1]['id']} is {nan[-1]['status']} in the database"
        if job_id:
            time.sleep(1.0)
            got = exchange(port, "GET", f"/v1/jobs/{job_id}")
            note += f"; GET /v1/jobs/{job_id} -> {got.status}"
        return post, note
    if not job_id:
        return post, f"POST -> {post.status} without a job"
    got = exchange(port, "GET", f"/v1/jobs/{job_id}")
    listed = exchange(port, "GET", "/v1/jobs?limit=5")
    note = (f"POST -> {post.status} (job {job_id}); GET /v1/jobs/{job_id} -> {got.status}; "
            f"GET /v1/jobs?limit=5 -> {listed.status}")
    got.ok_override = post.status == 400 or (got.status == 200 and listed.status == 200)
    return got, note


def custom_cases() -> list[Case]:
    return [

        Case("conn.disconnect_mid_body_generations", fn=case_disconnect_mid_body, group="connection"),
        Case("conn.disconnect_mid_body_edits", group="connection",
             fn=lambda ctx: case_disconnect_mid_body(ctx, "/v1/images/edits", "multipart/form-data; boundary=x")),
        Case("conn.disconnect_during_sync_job", fn=case_disconnect_during_job, group="connection"),
        Case("conn.slowloris_partial_headers_5s", fn=case_slowloris, group="connection"),
        Case("conn.queue_full_429", fn=case_queue_full, expect="429", group="connection"),
        Case("gen.limit.steps_1000_256px_sync_hits_job_timeout", "POST", "/v1/images/generations", [JSON_CT],
             jbody(with_(steps=1000, size="256x256", seed=31337)), "408", group="generations"),
        # last: if a NaN gets into a stored job, reading the job list may break for every case after it
        Case("gen.limit.scheduler_config.value_NaN.then_read_job", fn=case_nan_job, expect="400|200",
             group="generations"),
        Case("gen.limit.scheduler_config.value_NaN.async_202", fn=lambda ctx: case_nan_job(ctx, True),
             expect="4xx|202", group="generations"),
    ]


# -- running -------------------------------------------------------------------------------------------------------
def shape_of(resp: Resp) -> tuple[bool | None, str]:
    """(has OpenAI's error shape with a non-empty message, the message); None when not applicable."""
    if resp.status is None or resp.status < 400:
        return None, ""
    data = resp.json()
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        text = resp.body[:160].decode("utf-8", "replace")
        return False, text
    msg = err.get("message")
    ok = set(err) >= {"message", "type", "param", "code"} and isinstance(msg, str) and bool(msg.strip())
    return ok, msg if isinstance(msg, str) else repr(msg)


def run_case(case: Case, ctx) -> dict:
    port = ctx["auth_port"] if case.server == "auth" else ctx["port"]
    note = ""
    override = None
    if case.fn is not None:
        resp, note = case.fn(ctx)
        override = getattr(resp, "ok_override", None)
    elif case.raw is not None:
        resp = transfer(port, case.raw, method=case.method)
    else:
        headers = list(case.headers)
        if case.async_job:
            headers.append(("Prefer", "respond-async"))
        resp = exchange(port, case.method, case.path, headers, case.body, chunked=case.chunked, host=case.host)
    shaped, message = shape_of(resp)
    if case.method == "HEAD" and resp.status is not None and resp.status >= 400:
        shaped, message = None, "(HEAD: no body)"
    job_id = resp.headers.get("x-qimg-job-id")
    if resp.status == 202 and job_id:
        d = exchange(port, "DELETE", f"/v1/jobs/{job_id}")
        note = (note + "; " if note else "") + f"cancelled its job: DELETE -> {d.status}"
    sse = resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream")
    if sse and b"event: error" in resp.body:
        note = (note + "; " if note else "") + "the stream ended with an error event: " + \
            resp.body[resp.body.find(b"event: error"):][:200].decode("utf-8", "replace")
    if resp.status == 200 and not message:
        data = resp.json()
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            message = f"{len(data['data'])} item(s)"
    five = resp.status is not None and resp.status >= 500
    parser = resp.body.startswith(b"Invalid HTTP request received")
    ok = not five and not resp.hang and (shaped is not False or parser) and expect_ok(case.expect, resp.status)
    if case.fn is not None and override is not None:
        ok = ok and override
    # the server must still answer /health quickly
    h = exchange(ctx["port"], "GET", "/health", timeout=HEALTH_S)
    health_ok = h.status == 200 and h.elapsed < HEALTH_S
    ok = ok and health_ok
    return {"case": case.name, "group": case.group, "method": case.method, "path": case.path[:200],
            "server": case.server, "status": resp.status, "ms": round(resp.elapsed * 1000, 1),
            "total_ms": round(resp.total * 1000, 1), "hang": resp.hang, "shaped": shaped,
            "message": message[:400], "code": ((resp.json() or {}).get("error") or {}).get("code")
            if isinstance(resp.json(), dict) and isinstance((resp.json() or {}).get("error"), dict) else None,
            "expect": case.expect, "expected": expect_ok(case.expect, resp.status), "client_error": resp.error,
            "job_id": job_id, "note": note, "health_ms": round(h.elapsed * 1000, 1), "health_ok": health_ok,
            "http_parser": resp.body.startswith(b"Invalid HTTP request received"),
            "rss_mb": ctx["rss"]() if "rss" in ctx else None,
            "request_bytes": len(case.body) if case.body is not None else (len(case.raw) if case.raw else 0),
            "ok": ok}


def make_images() -> dict:
    from PIL import Image

    pal = Image.new("P", (64, 64), 3)
    pal.putpalette([i % 256 for i in range(768)])
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=3)
    big40 = image_bytes() + os.urandom(40 * 2**20)
    return {
        "png": image_bytes(), "png_rgba": image_bytes(mode="RGBA"), "jpeg": image_bytes("JPEG"),
        "webp": image_bytes("WEBP"), "gif": image_bytes("GIF"), "bmp": image_bytes("BMP"),
        "tiff": image_bytes("TIFF"), "ico": image_bytes("ICO", (32, 32)), "bomb": png_bomb(20000),
        "big40": big40, "webp_anim": animated_webp(), "png_i16": image_bytes(mode="I;16"),
        "png_la": image_bytes(mode="LA"), "png_p": buf.getvalue(), "png_1": image_bytes(mode="1"),
        "jpeg_cmyk": image_bytes("JPEG", mode="CMYK"), "jpeg_exif": exif_jpeg(), "png_1x1": image_bytes(size=(1, 1)),
        "png_wide": image_bytes(size=(4096, 1)), "png_tall": image_bytes(size=(1, 4096)),
        "pad32": padded_png(32 * 2**20),
    }


def setup(ctx) -> None:
    """Fixtures for the id-based cases: a finished job, its output PNG, a JPEG output, an edit's input, layers."""
    port = ctx["port"]
    r = exchange(port, "POST", "/v1/images/generations", [JSON_CT], jbody(with_(response_format="url")))
    assert r.status == 200, (r.status, r.body[:300])
    ctx["job_id"] = r.headers["x-qimg-job-id"]
    ctx["output_file"] = r.json()["data"][0]["url"].rsplit("/", 1)[1]
    r = exchange(port, "POST", "/v1/images/generations", [JSON_CT],
                 jbody(with_(response_format="url", output_format="jpeg")))
    assert r.status == 200, (r.status, r.body[:300])
    ctx["jpeg_file"] = r.json()["data"][0]["url"].rsplit("/", 1)[1]
    data, ctype = multipart([(k, v, None, None) for k, v in EDIT_FIELDS] + [("image", image_bytes(), "a.png", "image/png")])
    r = exchange(port, "POST", "/v1/images/edits", [("Content-Type", ctype)], data)
    assert r.status == 200, (r.status, r.body[:300])
    job = exchange(port, "GET", f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
    ctx["input_file"] = job["inputs"][0]["id"]
    data, ctype = multipart([("layers", "2", None, None), ("steps", "1", None, None), ("response_format", "url", None, None),
                             ("image", image_bytes(mode="RGBA"), "a.png", "image/png")])
    r = exchange(port, "POST", "/v1/images/layers", [("Content-Type", ctype)], data)
    if r.status == 200:
        ctx["layer_files"] = [d["url"].rsplit("/", 1)[1] for d in r.json()["data"]]
    else:
        print(f"(layers fixture: HTTP {r.status} {r.body[:200]!r}; export cases use a generated PNG)")


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="run only cases whose name contains this text")
    p.add_argument("--timeout", type=float, default=HANG_S, help="seconds without an answer that make a hang")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs, data)")
    p.add_argument("--heavy", action="store_true",
                   help="add a 2048x2048 1-step generation (within the cost budget): does --job-timeout 20 stop it? "
                        "(about 45 s of CPU for the tiny model on 2 cores)")
    args = p.parse_args(argv)

    wall_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="qimg-serve-attack-"))
    main_srv = auth_srv = None
    try:
        main_srv = Server(workdir, "main", ["--max-queue", "16", "--job-timeout", "20"])
        auth_srv = Server(workdir, "auth", ["--model", "qimg-tiny", "--lazy", "--api-key", API_KEY,
                                            "--max-queue", "4", "--job-timeout", "20"])
        images = make_images()
        main_srv.wait_ready()
        auth_srv.wait_ready(need_models=False)
        ctx = {"port": main_srv.port, "auth_port": auth_srv.port, "rss": main_srv.rss_mb, "data": main_srv.data}
        setup(ctx)
        cases = (generation_cases() + edit_cases(images) + layers_cases(images) + export_cases(ctx)
                 + resource_cases(ctx) + protocol_cases() + auth_cases() + custom_cases())
        if args.heavy:
            cases.append(Case("gen.heavy.2048x2048_steps1_vs_job_timeout_20s", "POST", "/v1/images/generations",
                              [JSON_CT], jbody(with_(size="2048x2048", seed=2048)), "408", group="generations"))
        names = [c.name for c in cases]
        dupes = {n for n in names if names.count(n) > 1}
        assert not dupes, f"duplicate case names: {sorted(dupes)}"
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        rss_before = main_srv.rss_mb()
        results = []
        print(f"{'case':<58} {'status':>6} {'ms':>8}  ok  message")
        for case in cases:
            try:
                row = run_case(case, ctx)
            except Exception as err:  # noqa: BLE001 - a bench bug must not hide the other cases
                row = {"case": case.name, "group": case.group, "status": None, "ms": None, "hang": False,
                       "shaped": None, "message": "", "ok": False, "bench_error": repr(err), "health_ok": True,
                       "expected": True, "expect": case.expect}
            results.append(row)
            msg = (row.get("message") or row.get("client_error") or row.get("bench_error") or "").replace("\n", " ")
            flag = "ok" if row["ok"] else "NO"
            ms = f"{row['ms']:.0f}" if row.get("ms") is not None else "-"
            print(f"{case.name[:58]:<58} {row['status']!s:>6} {ms:>8}  {flag:<3} {msg[:110]}", flush=True)
        rss_after = main_srv.rss_mb()
        alive = main_srv.alive() and auth_srv.alive()
        jobs, job_problems = all_jobs(main_srv.port)
        listed_by = "GET /v1/jobs"
        if job_problems:  # the API cannot list them: take the rows from the database and read each by id
            jobs, listed_by = stored_jobs(main_srv.data), "the database (the list failed)"
        for job in jobs:
            r = exchange(main_srv.port, "GET", f"/v1/jobs/{job['id']}")
            if r.status != 200:
                job_problems.append(f"GET /v1/jobs/{job['id']} -> {r.status} {r.body[:200]!r}")
        server_failed = [{"id": j["id"], "error": j.get("error"),
                          "params": {k: v for k, v in (j.get("params") or {}).items() if k in ("prompt", "width",
                                                                                                  "height", "steps",
                                                                                                  "scheduler")}
                          or j.get("params_text", "")[:300]}
                         for j in jobs if j["status"] == "failed" and (j.get("error") or {}).get("type")
                         in ("server_error", "internal_error", "model_error")]
        nan_jobs = [j["id"] for j in stored_jobs(main_srv.data) if re.search(r"\bNaN\b|Infinity", j["params_text"])]
        statuses = {}
        for j in jobs:
            statuses[j["status"]] = statuses.get(j["status"], 0) + 1
        log_text = main_srv.log.read_text(errors="replace") + auth_srv.log.read_text(errors="replace")
        log_errors = [ln for ln in log_text.splitlines() if re.search(r"ERROR|Traceback|Exception|Error:", ln)]

        n = len(results)
        five = [r for r in results if r.get("status") is not None and r["status"] >= 500]
        hangs = [r for r in results if r.get("hang")]
        unshaped = [r for r in results if r.get("shaped") is False]
        unshaped_app = [r for r in unshaped if not r.get("http_parser")]
        unexpected = [r for r in results if not r.get("expected", True)]
        slow_health = [r for r in results if not r.get("health_ok", True)]
        failed_rows = [r for r in results if not r["ok"]]
        summary = {
            "cases": n, "5xx": len(five), "hangs": len(hangs), "4xx_without_openai_shape": len(unshaped),
            "4xx_without_openai_shape_app_routes": len(unshaped_app), "unexpected_status": len(unexpected),
            "health_over_2s": len(slow_health), "not_ok": len(failed_rows), "server_alive": alive,
            "rss_before_mb": rss_before, "rss_after_mb": rss_after, "jobs_listed": len(jobs),
            "jobs_listed_from": listed_by, "job_statuses": statuses, "job_read_problems": job_problems[:50],
            "jobs_failed_with_server_error": server_failed, "jobs_stored_with_nan_or_infinity": nan_jobs,
            "wall_s": round(time.perf_counter() - wall_start, 1),
        }
        line = (f"{n} cases, {len(five)} 5xx, {len(hangs)} hangs, {len(unshaped)} 4xx without OpenAI shape "
                f"({len(unshaped_app)} not from uvicorn's HTTP parser), {len(unexpected)} unexpected status, "
                f"{len(slow_health)} slow /health, server alive {alive}, {len(jobs)} jobs (from {listed_by}; "
                f"{len(job_problems)} read problems, {len(server_failed)} failed with a server error), "
                f"server RSS {rss_before} MB before / {rss_after} MB after, wall {summary['wall_s']} s")
        print()
        for r in failed_rows:
            print(f"  NOT OK {r['case']}: status {r['status']} expect {r.get('expect')} shaped {r.get('shaped')} "
                  f"hang {r.get('hang')} health_ok {r.get('health_ok')} {r.get('client_error') or ''} "
                  f"{r.get('bench_error') or ''} {(r.get('message') or '')[:200]!r} {r.get('note') or ''}")
        for j in server_failed:
            print(f"  JOB FAILED WITH A SERVER ERROR {j}")
        for p_ in job_problems[:10]:
            print("  JOB READ PROBLEM", p_)
        if log_errors:
            print(f"  server log: {len(log_errors)} error line(s), first: {log_errors[:5]}")
        print(line)
        result = {"summary": summary, "summary_line": line, "cases": results, "server_log_errors": log_errors[:200],
                  "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform()}, "code": code_version(),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "server": "qimg serve (embedded qimg-tiny, qimg-tiny-layered) --max-queue 16 --job-timeout 20"}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        from qimg.atomic import atomic_write

        with atomic_write(out, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
        print(f"wrote {out}")
        bad = five or hangs or not alive or server_failed or job_problems
        return 1 if bad else 0
    finally:
        for srv in (main_srv, auth_srv):
            if srv is not None:
                srv.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
