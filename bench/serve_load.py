"""Load test of `qimg serve` on loopback: N concurrent clients post generations; nothing may be lost.

    python bench/serve_load.py [--clients 16] [--requests 64] [--steps N] [--size WxH] [--model PATH]
                               [--max-batch 1,8] [--url http://127.0.0.1:PORT] [--timeout 300]
                               [--replicas 1,2 [--store postgresql://...]]

Without --url it starts `qimg serve` in a subprocess on a free 127.0.0.1 port with a temporary data directory and
stops it at the end. The model is --model, else the embedded qimg-tiny, else a tiny random reference checkpoint
built with tests/reference.py (needs diffusers). Each client sends its share of the requests one after another;
an HTTP 429 (queue full) is retried after its Retry-After and counted. A request is lost if it never gets a 200
with an image, or if its job is not "succeeded" in /v1/jobs afterwards. The run is bounded by --timeout.

For each `--max-batch` value (default "1,16": batching off, then on) a fresh server runs the same requests (same
prompts and seeds); the pictures of every run are compared with the first run's, byte for byte.

With `--replicas` the runs are `qimg serve --ray --replicas N` instead (one per value; an ingress and N model
replicas on a local Ray, jobs in PostgreSQL: --store, else a temporary server from Debian's postgresql package);
replicas run one job at a time, so --max-batch does not apply.

Prints requests/s, p50/p95/p99 latency, lost requests and identical pictures per run, and the speed-up over the
first run; writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
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
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--size", default=None, help="WxH (default: the model's)")
    p.add_argument("--model", default=None)
    p.add_argument("--max-batch", default="1,16", help="comma-separated: one server run per value")
    p.add_argument("--url", default=None, help="an already running server (loopback only; one run)")
    p.add_argument("--max-queue", type=int, default=None, help="for the started server (default: --clients)")
    p.add_argument("--timeout", type=float, default=300.0, help="bound on each run, seconds")
    p.add_argument("--replicas", default=None, help="comma-separated: one `qimg serve --ray` run per value")
    p.add_argument("--store", default=None, help="PostgreSQL URL for --replicas (default: a temporary server)")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.replicas:
        plans = [(None, int(r)) for r in args.replicas.split(",")]
    else:
        plans = [(int(b), None) for b in args.max_batch.split(",")] if not args.url else [(None, None)]
    workdir = Path(tempfile.mkdtemp(prefix="qimg-serve-load-"))
    try:
        with contextlib.ExitStack() as stack:
            if args.replicas and not args.store:
                sys.path.insert(0, str(ROOT))
                from tests.pg_support import temporary_postgres

                args.store = stack.enter_context(temporary_postgres())
            return measure(args, plans, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args, plans, workdir: Path) -> int:
    model = "(running server)" if args.url else pick_model(args.model, workdir)
    runs, pictures = [], []
    for max_batch, replicas in plans:
        result, shas = run_once(args, model, max_batch, workdir, replicas)
        runs.append(result)
        pictures.append(shas)
    first = pictures[0]
    for result, shas in zip(runs, pictures):
        common = set(first) & set(shas)
        result["identical_pictures"] = sum(first[k] == shas[k] for k in common)
        result["compared_pictures"] = len(common)
        result["speedup_vs_first"] = (round(result["requests_per_s"] / runs[0]["requests_per_s"], 3)
                                      if runs[0]["requests_per_s"] else None)
    print(f"\n{'replicas':>8} {'max_batch':>9} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'lost':>5} "
          f"{'identical':>10} {'speed-up':>8}")
    for r in runs:
        print(f"{str(r['replicas']):>8} {str(r['max_batch']):>9} {r['requests_per_s']:>7} {r['latency_p50_s']:>7} "
              f"{r['latency_p95_s']:>7} {r['latency_p99_s']:>7} {r['lost']:>5} "
              f"{r['identical_pictures']:>4}/{r['compared_pictures']:<5} "
              f"{r['speedup_vs_first']:>8}")
    summary = {"clients": args.clients, "requests": args.requests, "steps": args.steps, "size": args.size,
               "model": model, "runs": runs,
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "platform": platform.platform()},
               "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from qimg.atomic import atomic_write

    with atomic_write(out, "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"wrote {out}")
    return 0 if all(r["lost"] == 0 for r in runs) else 1


def run_once(args, model: str, max_batch: int | None, workdir: Path, replicas: int | None = None) -> tuple[dict, dict]:
    """One server, all the requests: (the run's figures, {request: sha256 of its PNG})."""
    proc = None
    try:
        if args.url:
            parts = urlsplit(args.url)
            host, port = parts.hostname, parts.port or 80
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("--url must be a loopback address")
        else:
            host, port = "127.0.0.1", free_port()
            name = f"replicas-{replicas}" if replicas else f"batch-{max_batch}"
            cmd = [sys.executable, "-m", "qimg.cli", "serve", "--host", host, "--port", str(port), "--data-dir",
                   str(workdir / f"data-{name}"), "--model", f"bench={model}", "--max-queue",
                   str(args.max_queue if args.max_queue is not None else args.clients), "--log-level", "warning"]
            cmd += ["--ray", "--replicas", str(replicas), "--store", args.store] if replicas else \
                ["--max-batch", str(max_batch)]
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=subprocess.DEVNULL, stderr=open(workdir / f"server-{name}.log", "wb"),
                                    start_new_session=True)
        wait_ready(host, port, proc, timeout=300 if replicas else 120)
        warm = {"prompt": "warm-up", "seed": 0, **({"size": args.size} if args.size else {}),
                **({"steps": args.steps} if args.steps else {})}
        request(host, port, "POST", "/v1/images/generations", warm)  # first-call costs are not the server's rate

        deadline = time.monotonic() + args.timeout
        lock = threading.Lock()
        latencies, job_ids, failures, shas = [], [], [], {}
        counts = {"429": 0}
        per_client = [args.requests // args.clients + (1 if i < args.requests % args.clients else 0)
                      for i in range(args.clients)]
        colours = ["red", "green", "blue", "yellow", "white"]
        shapes = ["circle", "square", "triangle"]

        def client(index: int, n: int):
            for k in range(n):
                body = {"prompt": f"a {colours[(index + k) % 5]} {shapes[k % 3]} on a {colours[(index + 2) % 5]} "
                                  f"background", "seed": index * 1000 + k}
                if args.size:
                    body["size"] = args.size
                if args.steps:
                    body["steps"] = args.steps
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
                    png = None
                    if status == 200:
                        try:
                            data = json.loads(raw)["data"]
                            png = base64.b64decode(data[0]["b64_json"]) if len(data) == 1 else None
                        except (ValueError, KeyError, TypeError):
                            png = None
                    with lock:
                        if png is not None and png[:8] == b"\x89PNG\r\n\x1a\n":
                            latencies.append(time.perf_counter() - start)
                            job_ids.append(headers.get("x-qimg-job-id"))
                            shas[f"{index}/{k}"] = hashlib.sha256(pixels(png)).hexdigest()
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
        unconfirmed, batch_sizes = 0, []
        for job_id in job_ids:
            status, _, raw = request(host, port, "GET", f"/v1/jobs/{job_id}")
            job = json.loads(raw) if status == 200 else {}
            if job.get("status") != "succeeded":
                unconfirmed += 1
            batch_sizes.append((job.get("result") or {}).get("batch", 1))
        lost = args.requests - len(latencies) + unconfirmed
        result = {
            "max_batch": max_batch, "replicas": replicas, "completed": len(latencies), "lost": lost,
            "retried_429": counts["429"],
            "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 3) if wall else None,
            "latency_p50_s": round(percentile(latencies, 0.50), 4),
            "latency_p95_s": round(percentile(latencies, 0.95), 4),
            "latency_p99_s": round(percentile(latencies, 0.99), 4),
            "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
            "mean_batch": round(statistics.fmean(batch_sizes), 2) if batch_sizes else None,
            "failures": failures[:20],
        }
        print(f"replicas {replicas} max_batch {max_batch}: {args.clients} clients, {args.requests} requests: "
              f"{result['requests_per_s']} req/s, p50 {result['latency_p50_s']} s, p95 {result['latency_p95_s']} s, "
              f"lost {lost}, 429 retried {counts['429']}, mean batch {result['mean_batch']}, wall {result['wall_s']} s")
        for f in failures[:5]:
            print("  failure:", f)
        return result, shas
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(60 if replicas else 15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(5)


def pixels(png: bytes) -> bytes:
    """A PNG's decoded pixels (its metadata differs per job: job id, seconds, batch size)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.mode.encode() + repr(img.size).encode() + img.tobytes()


if __name__ == "__main__":
    sys.exit(main())
