"""Load test of `qimg serve` on loopback: N concurrent clients post generations; nothing may be lost.

    python bench/serve_load.py [--clients 8] [--requests 48] [--steps 1] [--size 64x64] [--model PATH]
                               [--url http://127.0.0.1:PORT] [--timeout 300]

Without --url it starts `qimg serve` in a subprocess on a free 127.0.0.1 port with a temporary data directory and
stops it at the end. The model is --model, else the embedded qimg-tiny, else a tiny random reference checkpoint
built with tests/reference.py (needs diffusers). Each client sends its share of the requests one after another;
an HTTP 429 (queue full) is retried after its Retry-After and counted. A request is lost if it never gets a 200
with an image, or if its job is not "succeeded" in /v1/jobs afterwards. The run is bounded by --timeout.

Prints requests/s, p50/p99 latency and lost requests; writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve_load.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_model(arg: str | None, workdir: Path) -> str:
    if arg:
        return arg
    from qimg.loading.files import default_model_path

    if (default_model_path() / "model_index.json").exists():
        return str(default_model_path())
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.reference import build_reference_21

    folder = workdir / "reference"
    build_reference_21(folder)
    return str(folder)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def request(host, port, method, path, body=None, timeout=120.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = conn.getresponse()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    finally:
        conn.close()


def wait_ready(host, port, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            status, _, body = request(host, port, "GET", "/health", timeout=2)
            health = json.loads(body)
            if status == 200 and not health["queue"]["loading_models"]:
                return health
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become ready")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--size", default="64x64")
    p.add_argument("--model", default=None)
    p.add_argument("--url", default=None, help="an already running server (loopback only)")
    p.add_argument("--max-queue", type=int, default=None, help="for the started server (default: --clients)")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run, seconds")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="qimg-serve-load-"))
    proc = None
    try:
        if args.url:
            parts = urlsplit(args.url)
            host, port = parts.hostname, parts.port or 80
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("--url must be a loopback address")
            model = "(running server)"
        else:
            host, port = "127.0.0.1", free_port()
            model = pick_model(args.model, workdir)
            cmd = [sys.executable, "-m", "qimg.cli", "serve", "--host", host, "--port", str(port), "--data-dir",
                   str(workdir / "data"), "--model", f"bench={model}", "--max-queue",
                   str(args.max_queue if args.max_queue is not None else args.clients), "--log-level", "warning"]
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=subprocess.DEVNULL, stderr=open(workdir / "server.log", "wb"))
        wait_ready(host, port, proc)

        deadline = time.monotonic() + args.timeout
        lock = threading.Lock()
        latencies, job_ids, failures = [], [], []
        counts = {"429": 0}
        per_client = [args.requests // args.clients + (1 if i < args.requests % args.clients else 0)
                      for i in range(args.clients)]

        def client(index: int, n: int):
            for k in range(n):
                body = {"prompt": f"client {index} request {k}", "size": args.size, "steps": args.steps,
                        "seed": index * 1000 + k}
                start = time.perf_counter()
                while True:
                    if time.monotonic() > deadline:
                        with lock:
                            failures.append(f"client {index} request {k}: run deadline passed")
                        return
                    try:
                        status, headers, raw = request(host, port, "POST", "/v1/images/generations", body,
                                                       timeout=max(1.0, deadline - time.monotonic()))
                    except OSError as err:
                        with lock:
                            failures.append(f"client {index} request {k}: {err!r}")
                        break
                    if status == 429:
                        with lock:
                            counts["429"] += 1
                        time.sleep(min(float(headers.get("retry-after", "1")), 5.0))
                        continue
                    ok = False
                    if status == 200:
                        try:
                            data = json.loads(raw)["data"]
                            ok = len(data) == 1 and base64.b64decode(data[0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
                        except (ValueError, KeyError, TypeError):
                            ok = False
                    with lock:
                        if ok:
                            latencies.append(time.perf_counter() - start)
                            job_ids.append(headers.get("x-qimg-job-id"))
                        else:
                            failures.append(f"client {index} request {k}: HTTP {status} {raw[:200]!r}")
                    break

        threads = [threading.Thread(target=client, args=(i, n)) for i, n in enumerate(per_client)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + 5))
        wall = time.perf_counter() - started

        # every answered job must be recorded as succeeded
        unconfirmed = 0
        for job_id in job_ids:
            status, _, raw = request(host, port, "GET", f"/v1/jobs/{job_id}")
            if status != 200 or json.loads(raw)["status"] != "succeeded":
                unconfirmed += 1
        lost = args.requests - len(latencies) + unconfirmed
        result = {
            "clients": args.clients, "requests": args.requests, "steps": args.steps, "size": args.size,
            "model": model, "completed": len(latencies), "lost": lost, "retried_429": counts["429"],
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3) if wall else None,
            "latency_p50_s": round(percentile(latencies, 0.50), 4), "latency_p99_s": round(percentile(latencies, 0.99), 4),
            "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
            "failures": failures[:20], "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                                   "platform": platform.platform()},
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        print(f"{args.clients} clients, {args.requests} requests ({args.size}, {args.steps} step(s)): "
              f"{result['requests_per_s']} req/s, p50 {result['latency_p50_s']} s, p99 {result['latency_p99_s']} s, "
              f"lost {lost}, 429 retried {counts['429']}, wall {result['wall_s']} s")
        for f in failures[:5]:
            print("  failure:", f)
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        from qimg.atomic import atomic_write

        with atomic_write(out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {out}")
        return 0 if lost == 0 else 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
