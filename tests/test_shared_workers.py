"""`qimg worker` processes on one PostgreSQL job store (a real server, started per module) behind an API process
that runs no jobs: every job runs exactly once, a synchronous request is answered when its job ran in another
process, a cancel reaches the process running the job, and a worker killed with SIGKILL mid-job has its job
taken back and finished by the other; one stopped with SIGTERM hands its job back at once."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.serve_support import REPO, ServerThread, make_settings, reference_checkpoint


TERMINAL = ("succeeded", "failed", "cancelled")


def start_worker(url: str, folder: Path, name: str) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / f"{name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "qimg.cli", "worker", "--store", url, "--data-dir", str(folder / "data"), "--model",
         f"tiny={reference_checkpoint()}", "--owner", name, "--stale-after", "4", "--job-timeout", "0",
         "--log-level", "warning"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)


def rows(store) -> dict:
    return {job_id: (status, attempts, worker) for job_id, status, attempts, worker in store._db.execute(
        "SELECT id, status, attempts, worker FROM jobs").fetchall()}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
    return found


def submit(http, url: str, steps: int = 1, size: str = "64x64", **extra) -> str:
    made = http.post(f"{url}/v1/images/generations", headers={"Prefer": "respond-async"},
                     json={"prompt": "a red circle", "size": size, "steps": steps, "model": "tiny", **extra})
    assert made.status_code == 202, made.text
    return made.json()["id"]


@pytest.mark.slow
def test_workers_share_one_database(postgres_url, tmp_path):
    from qimg.serve.store_postgres import PostgresJobStore

    store = PostgresJobStore(postgres_url, owner="test")
    store._db.execute("TRUNCATE jobs, files CASCADE")
    api_settings = make_settings(tmp_path / "api", store=postgres_url, owner="api", run_jobs=False, max_queue=200,
                                 stale_after_s=4.0)
    workers = {name: start_worker(postgres_url, tmp_path / name, name) for name in ("w1", "w2")}
    try:
        with ServerThread(api_settings) as api, httpx.Client(timeout=300) as http:
            # 50 jobs through the API process, run by the two workers: each exactly once
            ids = [submit(http, api.url, seed=i) for i in range(50)]
            wait_for(lambda: all(r[0] in TERMINAL for r in rows(store).values()), 600, "50 jobs to end")
            done = rows(store)
            assert {done[i][0] for i in ids} == {"succeeded"}, [done[i] for i in ids if done[i][0] != "succeeded"]
            assert {done[i][1] for i in ids} == {1}  # started once each
            assert {done[i][2] for i in ids} == {"w1", "w2"}  # both took part
            job = http.get(f"{api.url}/v1/jobs/{ids[0]}").json()
            picture = http.get(f"{api.url}/v1/files/{job['outputs'][0]['id']}")
            assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"

            # a synchronous request whose job runs in a worker process is answered by the API process
            answer = http.post(f"{api.url}/v1/images/generations",
                               json={"prompt": "a blue square", "size": "64x64", "steps": 1, "model": "tiny"})
            assert answer.status_code == 200, answer.text
            assert base64.b64decode(answer.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"

            # a cancel through the API reaches the worker running the job
            slow = submit(http, api.url, steps=1000, size="512x512")
            wait_for(lambda: rows(store)[slow][0] == "running", 120, "the slow job to start")
            assert http.delete(f"{api.url}/v1/jobs/{slow}").status_code in (200, 202)
            wait_for(lambda: rows(store)[slow][0] in TERMINAL, 60, "the cancelled job to end")
            assert rows(store)[slow][0] == "cancelled"

            # SIGKILL the worker running a job: the other takes it back and finishes it
            victim_job = submit(http, api.url, steps=300, size="512x512")
            running = wait_for(lambda: rows(store)[victim_job][2] if rows(store)[victim_job][0] == "running" else None,
                               120, "the job to start")
            os.killpg(workers[running].pid, signal.SIGKILL)
            workers[running].wait(10)
            status, attempts, worker = wait_for(
                lambda: rows(store)[victim_job] if rows(store)[victim_job][0] in TERMINAL else None, 300,
                "the killed worker's job to end")
            assert (status, attempts) == ("succeeded", 2) and worker != running
            seen = http.get(f"{api.url}/v1/jobs/{victim_job}").json()
            assert seen["status"] == "succeeded" and len(seen["outputs"]) == 1

            # SIGTERM (a graceful stop) of the worker running a job hands the job back at once
            workers["w3"] = start_worker(postgres_url, tmp_path / "w3", "w3")
            stopped_job = submit(http, api.url, steps=300, size="512x512")
            wait_for(lambda: rows(store)[stopped_job][0] == "running", 120, "the job to start")
            busy = rows(store)[stopped_job][2]
            workers[busy].send_signal(signal.SIGTERM)
            assert workers[busy].wait(30) == 0
            assert rows(store)[stopped_job][0] in ("queued", "running")  # handed back, not failed
            status, attempts, worker = wait_for(
                lambda: rows(store)[stopped_job] if rows(store)[stopped_job][0] in TERMINAL else None, 300,
                "the handed-back job to end")
            assert (status, attempts) == ("succeeded", 2) and worker != busy
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        store.close()


def test_admission_counts_the_jobs_queued_in_the_database(postgres_url, tmp_path):
    """With no worker running, an API process on the shared store takes `max_queue` jobs, then answers 429 with a
    Retry-After; its /health says the jobs run in the workers."""
    from qimg.serve.store_postgres import PostgresJobStore

    store = PostgresJobStore(postgres_url, owner="test")
    store._db.execute("TRUNCATE jobs, files CASCADE")
    settings = make_settings(tmp_path / "api", store=postgres_url, run_jobs=False, max_queue=2)
    with ServerThread(settings) as api, httpx.Client(timeout=60) as http:
        ids = [submit(http, api.url) for _ in range(2)]
        refused = http.post(f"{api.url}/v1/images/generations", headers={"Prefer": "respond-async"},
                            json={"prompt": "a red circle", "size": "64x64", "steps": 1, "model": "tiny"})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1, refused.text
        health = http.get(f"{api.url}/health").json()
        assert health["jobs_run_by"] == "workers on the shared store" and health["queue"]["waiting"] == 2
        assert http.delete(f"{api.url}/v1/jobs/{ids[0]}").status_code in (200, 202)
        assert submit(http, api.url)  # a slot again
    store.close()
