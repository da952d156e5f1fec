"""Crash safety of `qimg serve`: jobs survive `kill -9` of the server, again and again, and nothing is corrupted.

    python bench/serve_kill.py [--jobs 100] [--kills 18] [--startup-kills 3] [--seed 0] [--timeout 240]
                               [--output bench/results/serve_kill.json]

Starts `python -m qimg.cli serve --model qimg-tiny --max-queue 100` (the embedded tiny model; the server's default
batching) on a free 127.0.0.1 port with a temporary data directory. A client thread submits --jobs generations
asynchronously (`Prefer: respond-async`, answered 202 with the queued job; 128x128, 3 steps, distinct seeds) in one
burst per kill cycle, spread over the cycle, retrying a submission whose answer never came (the server was killed
meanwhile, or is not up yet). The server's process group is killed with SIGKILL --kills times: most of them 0.3-3 s
after the server became ready (jobs queued and running), --startup-kills of them while it starts (0.1-1 s after the
process was spawned: start-up recovery itself is interrupted). After each kill the data directory is inspected as the
kill left it, and the server is started again on the same port and data directory (requeue is on by default:
queued jobs run after a restart; the jobs running at the kill, a whole batch, are marked failed with error_type
"server_restart"). After the last restart the bench submits what is left and waits until no job is queued or running.

Counted at the end:
  lost     acknowledged job ids (a 202 came back) missing from GET /v1/jobs (paged with ?before=)
  corrupt  succeeded jobs whose output (GET its url) is not a decodable 128x128 PNG of the recorded length (or ran with
           another seed), indexed files missing on disk, files under data-dir/files with no index row, leftover *.tmp
           anywhere under the data dir, outputs kept by jobs that were failed by a restart
  problems jobs still queued/running at the end, jobs failed by a restart that never started or started after every
           kill, jobs that do not read back by id
and the jobs succeeded / failed by a restart / failed otherwise / cancelled.

Prints a table (one row per kill) and a summary line; writes bench/results/serve_kill.json. Exit 1 if any job is
lost or corrupt (or there is a problem above).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/attack, as a package beside this script
from attack.client import code_version, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve_kill.json"
SIZE = 128


def request(port, method, path, body=None, headers=None, timeout=10.0):
    """(status, headers, body bytes); raises OSError when the server is not there or goes away."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (TimeoutError, http.client.HTTPException, ConnectionError) as err:
        raise OSError(f"{type(err).__name__}: {err}") from err
    finally:
        conn.close()


class Server:
    """One `qimg serve` process at a time on a fixed port and data directory, in its own process group."""

    def __init__(self, workdir: Path, port: int, max_queue: int):
        self.workdir, self.port, self.max_queue = workdir, port, max_queue
        self.data = workdir / "data"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_paths: list[Path] = []

    def start(self) -> None:
        log = self.workdir / f"server-{self.starts:02d}.log"
        self.log_paths.append(log)
        cmd = [sys.executable, "-m", "qimg.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data), "--model", "qimg-tiny", "--max-queue", str(self.max_queue),
               "--log-level", "warning"]
        with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                         stdout=subprocess.DEVNULL, stderr=handle, start_new_session=True)
        self.spawned = time.monotonic()
        self.starts += 1

    def wait_ready(self, timeout=120.0) -> float:
        """Seconds from spawn until /health answers with the models loaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: "
                                   f"{self.log_paths[-1].read_text(errors='replace')[-2000:]}")
            try:
                status, _, raw = request(self.port, "GET", "/health", timeout=2)
                if status == 200 and not json.loads(raw)["queue"]["loading_models"]:
                    return time.monotonic() - self.spawned
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Submitter(threading.Thread):
    """Submits jobs in bursts (`add(n)`), one after another; an attempt whose answer never came (the server was
    killed, or is not up yet) is retried until the server answers."""

    def __init__(self, port: int, jobs: int, seed_base: int, rng: random.Random):
        super().__init__(daemon=True)
        self.port, self.jobs, self.seed_base, self.rng = port, jobs, seed_base, rng
        self.acked: dict[str, int] = {}  # job id -> seed
        self.attempts = 0
        self.unanswered = 0  # attempts that got no answer
        self.refused: list[str] = []  # answers other than 202
        self.done = threading.Event()
        self._bursts: list[list] = []  # [jobs left, seconds between jobs, seconds to wait before the first]
        self._cond = threading.Condition()

    def add(self, n: int, over: float = 0.0, after: float = 0.0) -> None:
        """Submit `n` more jobs, `after` seconds from now, spread over about `over` seconds."""
        with self._cond:
            self._bursts.append([n, over / max(n, 1), after, time.monotonic()])
            self._cond.notify()

    def run(self) -> None:
        gap = 0.0
        for i in range(self.jobs):
            with self._cond:
                while not self._bursts:
                    self._cond.wait()
                burst = self._bursts[0]
                first, gap = burst[2] is not None, burst[1]
                wait = burst[3] + burst[2] - time.monotonic() if first else 0.0
                burst[0] -= 1
                burst[2] = None
                if burst[0] <= 0:
                    self._bursts.pop(0)
            if wait > 0:
                time.sleep(wait)
            seed = self.seed_base + i
            body = {"prompt": f"a red circle and a blue square, job {i}", "size": f"{SIZE}x{SIZE}", "steps": 3,
                    "seed": seed}
            while True:
                self.attempts += 1
                try:
                    status, headers, raw = request(self.port, "POST", "/v1/images/generations", body,
                                                   {"Prefer": "respond-async"}, timeout=10)
                except OSError:
                    self.unanswered += 1
                    time.sleep(0.05)
                    continue
                if status == 202:
                    job = json.loads(raw)
                    self.acked[job["id"]] = seed
                    if headers.get("x-qimg-job-id") != job["id"]:
                        self.refused.append(f"job {i}: header id {headers.get('x-qimg-job-id')} != body id {job['id']}")
                    break
                if status in (429, 503):  # queue full / shutting down: try again
                    time.sleep(0.2)
                    continue
                self.refused.append(f"job {i}: HTTP {status} {raw[:200]!r}")
                break
            time.sleep(gap * self.rng.uniform(0.5, 1.5))
        self.done.set()


def bursts(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` split into `parts` random positive sizes (as even as chance makes them)."""
    parts = max(1, min(parts, total))
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def list_jobs(port) -> list[dict]:
    jobs, before = [], None
    while True:
        path = "/v1/jobs?limit=200" + (f"&before={before}" if before else "")
        status, _, raw = request(port, "GET", path, timeout=30)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status} {raw[:300]!r}")
        page = json.loads(raw)
        jobs += page["data"]
        if not page["has_more"] or not page["data"]:
            return jobs
        before = page["data"][-1]["id"]


def inspect_data_dir(data: Path) -> dict:
    """What is on disk: *.tmp anywhere, files with no index row, index rows with no file. Read-only."""
    files_dir = data / "files"
    tmp = [str(p.relative_to(data)) for p in data.rglob("*.tmp")]
    on_disk = {p.name for p in files_dir.iterdir() if p.is_file()} if files_dir.is_dir() else set()
    indexed: dict[str, tuple] = {}
    db_path = data / "jobs.sqlite3"
    if db_path.exists():
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        try:
            for row in db.execute("SELECT name, id, job_id, role, bytes FROM files"):
                indexed[row[0]] = row[1:]
        finally:
            db.close()
    unindexed = sorted(n for n in on_disk - set(indexed) if not n.endswith(".tmp"))
    missing = sorted(n for n in set(indexed) - on_disk)
    wrong_size = sorted(n for n, (_, _, _, size) in indexed.items()
                        if n in on_disk and (files_dir / n).stat().st_size != size)
    return {"tmp": tmp, "unindexed": unindexed, "missing": missing, "wrong_size": wrong_size,
            "files_on_disk": len(on_disk), "files_indexed": len(indexed)}


def check_png(data: bytes) -> str | None:
    """None if `data` is a complete, decodable SIZE x SIZE PNG; else what is wrong."""
    from PIL import Image

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return f"not a PNG (starts {data[:8]!r}, {len(data)} bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format != "PNG" or img.size != (SIZE, SIZE):
                return f"{img.format} {img.size[0]}x{img.size[1]}, expected PNG {SIZE}x{SIZE}"
    except Exception as err:  # noqa: BLE001 - any decoding failure is corruption
        return f"does not decode: {type(err).__name__}: {err}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--kills", type=int, default=18, help="SIGKILLs in all (startup kills included)")
    p.add_argument("--startup-kills", type=int, default=3, help="of which this many while the server starts")
    p.add_argument("--min-run", type=float, default=0.3)
    p.add_argument("--max-run", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="random seed of the kill moments")
    p.add_argument("--timeout", type=float, default=240.0, help="bound on draining the jobs after the last restart")
    p.add_argument("--output", default=str(RESULTS))
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (server logs, data)")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    wall_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="qimg-serve-kill-"))
    server = Server(workdir, free_port(), max_queue=args.jobs)
    submitter = None
    rows, problems = [], []
    try:
        server.start()
        first_ready = server.wait_ready()
        submitter = Submitter(server.port, args.jobs, 100_000, rng)
        submitter.start()
        sizes = bursts(args.jobs, args.kills, rng)  # one burst per cycle, spread over the cycle
        startup_slots = set(rng.sample(range(1, args.kills), min(args.startup_kills, max(args.kills - 1, 0))))
        print(f"server ready in {first_ready:.1f} s on port {server.port}; {args.jobs} jobs, {args.kills} kills "
              f"({len(startup_slots)} during start-up)")
        print(f"{'kill':>4} {'phase':<8} {'burst':<10} {'after_s':>7} {'acked':>5} {'running_job':<16} {'waiting':>7} "
              f"{'tmp':>3} {'unidx':>5} {'ready_s':>7}")
        phases = ["startup" if k in startup_slots else "running" for k in range(args.kills)]
        for k, phase in enumerate(phases):
            running = waiting = None
            timing = "retried"
            if phase == "startup":  # the server was spawned and not waited for: kill it while it starts
                delay = rng.uniform(0.1, 1.0)
                submitter.add(sizes[k])  # these wait (retrying) until a server answers
                time.sleep(max(0.0, server.spawned + delay - time.monotonic()))
            else:
                delay = rng.uniform(args.min_run, args.max_run)
                timing = rng.choice(("spread", "early", "late"))  # over the cycle, at its start, just before the kill
                if timing == "spread":
                    submitter.add(sizes[k], over=delay)
                elif timing == "early":
                    submitter.add(sizes[k])
                else:
                    submitter.add(sizes[k], over=0.15 * delay, after=0.8 * delay)
                time.sleep(delay)
                try:
                    _, _, raw = request(server.port, "GET", "/health", timeout=1)
                    queue = json.loads(raw)["queue"]
                    running, waiting = queue["running"], queue["waiting"]
                except (OSError, ValueError, KeyError):
                    pass
            server.kill()
            kill_time = time.time()
            after_kill = inspect_data_dir(server.data)  # as the kill left it (start-up sweeps it)
            server.start()
            next_startup = k + 1 < len(phases) and phases[k + 1] == "startup"
            ready_s = None if next_startup else server.wait_ready()
            row = {"kill": k + 1, "phase": phase, "burst": f"{sizes[k]} {timing}", "time": kill_time,
                   "after_s": round(delay, 2), "acked": len(submitter.acked),
                   "running_job": running, "waiting": waiting, "tmp_after_kill": len(after_kill["tmp"]),
                   "unindexed_after_kill": len(after_kill["unindexed"]),
                   "ready_s": None if ready_s is None else round(ready_s, 2)}
            rows.append(row)
            print(f"{row['kill']:>4} {phase:<8} {row['burst']:<10} {delay:>7.2f} {row['acked']:>5} "
                  f"{str(running or '-')[:16]:<16} "
                  f"{waiting if waiting is not None else '-'!s:>7} {row['tmp_after_kill']:>3} "
                  f"{row['unindexed_after_kill']:>5} {'-' if ready_s is None else f'{ready_s:.2f}':>7}", flush=True)
        # the last server runs everything left
        submitter.add(args.jobs)  # whatever is left (the bursts may not have been used up)
        submitter.done.wait(120)
        if not submitter.done.is_set():
            problems.append("the submitter did not finish")
        deadline = time.monotonic() + args.timeout
        drained = False
        while time.monotonic() < deadline:
            jobs = list_jobs(server.port)
            if not any(j["status"] in ("queued", "running") for j in jobs):
                drained = True
                break
            time.sleep(0.5)
        if not drained:
            problems.append(f"jobs still queued or running {args.timeout:g} s after the last restart")

        # -- the checks ------------------------------------------------------------------------------------------
        jobs = list_jobs(server.port)
        by_id = {j["id"]: j for j in jobs}
        acked = submitter.acked
        lost = sorted(j for j in acked if j not in by_id)
        unfinished = sorted(j for j in acked if j in by_id and by_id[j]["status"] in ("queued", "running"))
        statuses: dict[str, int] = {}
        failed_by_restart, failed_other, cancelled, succeeded = [], [], [], []
        for job_id in acked:
            job = by_id.get(job_id)
            if job is None:
                continue
            statuses[job["status"]] = statuses.get(job["status"], 0) + 1
            err = job.get("error") or {}
            if job["status"] == "succeeded":
                succeeded.append(job)
            elif job["status"] == "failed" and err.get("type") == "server_restart":
                failed_by_restart.append(job)
            elif job["status"] == "failed":
                failed_other.append({"id": job_id, "error": err})
            elif job["status"] == "cancelled":
                cancelled.append({"id": job_id, "error": err})
        # every job (acked or not) must read back by id
        unreadable = []
        for job in jobs:
            status, _, raw = request(server.port, "GET", f"/v1/jobs/{job['id']}")
            if status != 200:
                unreadable.append(f"{job['id']}: HTTP {status} {raw[:200]!r}")
        corrupt = []
        for job in succeeded:
            outputs = job.get("outputs") or []
            if len(outputs) != 1:
                corrupt.append(f"{job['id']}: succeeded with {len(outputs)} outputs")
                continue
            out = outputs[0]
            path = "/" + out["url"].split("/", 3)[3] if out["url"].startswith("http") else out["url"]
            try:
                status, _, data = request(server.port, "GET", path, timeout=30)
            except OSError as err:
                corrupt.append(f"{job['id']}: GET {path} failed: {err}")
                continue
            if status != 200:
                corrupt.append(f"{job['id']}: GET {path} -> {status}")
                continue
            if len(data) != out["bytes"]:
                corrupt.append(f"{job['id']}: {path} is {len(data)} bytes, recorded {out['bytes']}")
            bad = check_png(data)
            if bad:
                corrupt.append(f"{job['id']}: {path} {bad}")
            if job["result"].get("seed") != acked[job["id"]]:
                corrupt.append(f"{job['id']}: ran with seed {job['result'].get('seed')}, submitted {acked[job['id']]}")
        for job in failed_by_restart:
            if job.get("outputs"):
                corrupt.append(f"{job['id']}: failed by a restart but keeps {len(job['outputs'])} output(s)")
        final_disk = inspect_data_dir(server.data)
        corrupt += [f"leftover temporary {t}" for t in final_disk["tmp"]]
        corrupt += [f"file not indexed: files/{n}" for n in final_disk["unindexed"]]
        corrupt += [f"indexed file missing on disk: files/{n}" for n in final_disk["missing"]]
        corrupt += [f"file size differs from its index row: files/{n}" for n in final_disk["wrong_size"]]
        # a job failed by a restart must have been running at a kill: started before it, not finished
        kill_times = [r["time"] for r in rows]
        never_ran = [j["id"] for j in failed_by_restart if j.get("started_at") is None]
        not_at_a_kill = [j["id"] for j in failed_by_restart if j.get("started_at") is not None
                         and not any(j["started_at"] <= t for t in kill_times)]
        if never_ran:
            problems.append(f"{len(never_ran)} queued job(s) (never started) were failed by a restart: {never_ran[:5]}")
        if not_at_a_kill:
            problems.append(f"{len(not_at_a_kill)} job(s) failed by a restart started after every kill: "
                            f"{not_at_a_kill[:5]}")
        kills_failing = len({min((t for t in kill_times if t >= j["started_at"]), default=None)
                             for j in failed_by_restart if j.get("started_at") is not None})
        running_at_kill = {r["running_job"] for r in rows if r["running_job"]}
        not_failed = [j for j in running_at_kill if j in by_id and by_id[j]["status"] not in ("failed", "succeeded")]
        extra = sorted(set(by_id) - set(acked))  # created by attempts whose answer never came
        logs = "\n".join(p_.read_text(errors="replace") for p_ in server.log_paths if p_.exists())
        swept = [int(m) for m in re.findall(r"(\d+) stray file\(s\) removed", logs)]
        requeued = [int(m) for m in re.findall(r"(\d+) job\(s\) left queued were queued again", logs)]
        log_errors = [ln for ln in logs.splitlines() if re.search(r"ERROR|Traceback", ln)]

        summary = {
            "jobs": args.jobs, "acknowledged": len(acked), "submit_attempts": submitter.attempts,
            "unanswered_attempts": submitter.unanswered, "unacknowledged_jobs_created": len(extra),
            "refused": submitter.refused, "kills": len(rows),
            "kills_during_startup": sum(r["phase"] == "startup" for r in rows),
            "kills_with_a_running_job": sum(bool(r["running_job"]) for r in rows),
            "succeeded": len(succeeded), "failed_by_restart": len(failed_by_restart),
            "kills_that_failed_jobs": kills_failing,
            "batch_sizes_succeeded": sorted({(j.get("result") or {}).get("batch") for j in succeeded}, key=str),
            "failed_other": failed_other, "cancelled": cancelled, "lost": len(lost), "lost_ids": lost,
            "unfinished": unfinished, "corrupt": len(corrupt), "corrupt_detail": corrupt[:50],
            "unreadable_jobs": unreadable[:20], "running_at_kill_not_failed": not_failed,
            "stray_files_swept_at_restarts": sum(swept), "jobs_requeued_at_restarts": sum(requeued),
            "tmp_files_left_by_kills": sum(r["tmp_after_kill"] for r in rows),
            "unindexed_files_left_by_kills": sum(r["unindexed_after_kill"] for r in rows),
            "final_disk": {k: v for k, v in final_disk.items() if k in ("files_on_disk", "files_indexed")},
            "server_log_error_lines": log_errors[:50], "problems": problems,
            "first_ready_s": round(first_ready, 2),
            "mean_restart_ready_s": round(sum(r["ready_s"] for r in rows if r["ready_s"]) /
                                          max(1, sum(1 for r in rows if r["ready_s"])), 2),
            "wall_s": round(time.perf_counter() - wall_start, 1),
        }
        line = (f"{len(rows)} kills ({summary['kills_during_startup']} during start-up, "
                f"{summary['kills_with_a_running_job']} with a job running), {len(acked)}/{args.jobs} jobs "
                f"acknowledged: {len(succeeded)} succeeded, {len(failed_by_restart)} failed by restart "
                f"(at {kills_failing} kills), "
                f"{len(failed_other)} failed otherwise, {len(cancelled)} cancelled, {len(lost)} lost, "
                f"{len(corrupt)} corrupt, {len(unfinished)} unfinished; {summary['jobs_requeued_at_restarts']} "
                f"requeues, {summary['stray_files_swept_at_restarts']} stray files swept; wall {summary['wall_s']} s")
        print()
        for c in corrupt[:20]:
            print("  CORRUPT", c)
        for j in lost[:20]:
            print("  LOST", j)
        for f in failed_other[:10]:
            print("  FAILED", f)
        for u in unreadable[:10]:
            print("  UNREADABLE", u)
        for pr in problems:
            print("  PROBLEM", pr)
        if log_errors:
            print(f"  server logs: {len(log_errors)} error line(s), first: {log_errors[:3]}")
        print(line)
        result = {"summary": summary, "summary_line": line, "kills": rows,
                  "jobs": [{"id": j, "seed": s, "status": by_id.get(j, {}).get("status"),
                            "error": by_id.get(j, {}).get("error")} for j, s in acked.items()],
                  "settings": {"jobs": args.jobs, "kills": args.kills, "startup_kills": args.startup_kills,
                               "run_s": [args.min_run, args.max_run], "seed": args.seed, "size": f"{SIZE}x{SIZE}",
                               "steps": 3, "server": "qimg serve --model qimg-tiny --max-queue "
                                                     f"{args.jobs} (requeue on)"},
                  "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform()}, "code": code_version(),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        from qimg.atomic import atomic_write

        with atomic_write(out, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
        print(f"wrote {out}")
        return 1 if (lost or corrupt or unfinished or problems or unreadable) else 0
    finally:
        server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
