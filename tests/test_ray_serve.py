"""`qimg serve --ray` on this machine (a local Ray started by the server, a PostgreSQL server of the module's own):
two replicas of qimg-tiny serve 100 requests at concurrency 8 through the official `openai` client; one replica's
process is killed with SIGKILL mid-load. Every request must end with a picture or a clear error, and the job list
must agree: every job ended, one succeeded job per picture. Streamed partial images cross from replica to client."""

from __future__ import annotations

import concurrent.futures as futures
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve_support import REPO, free_port

pytestmark = pytest.mark.slow
REQUESTS, CONCURRENCY = 100, 8


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:qimg:qimg-replicas"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_two_ray_replicas_survive_a_killed_one(postgres_url, tmp_path):
    pytest.importorskip("ray")
    openai = pytest.importorskip("openai")
    from qimg.serve.store_postgres import PostgresJobStore

    store = PostgresJobStore(postgres_url, owner="test")
    store._db.execute("TRUNCATE jobs, files CASCADE")
    port = free_port()
    log = open(tmp_path / "serve.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "qimg.cli", "serve", "--ray", "--replicas", "2", "--store", postgres_url, "--port",
         str(port), "--data-dir", str(tmp_path / "data"), "--max-queue", "64", "--stale-after", "10"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "Ray Serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200 and len(replica_pids()) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def one(i: int):
            try:
                made = client.images.generate(model="qimg-tiny", prompt="a small green square on the left",
                                              size="128x128", extra_body={"steps": 24, "seed": i})
                return "ok", made.data[0].b64_json
            except openai.APIStatusError as err:
                return "error", f"{err.status_code}: {err.message}"

        with futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            pending = [pool.submit(one, i) for i in range(REQUESTS)]
            while sum(f.done() for f in pending) < 15:  # mid-load
                time.sleep(0.2)
            while store._db.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0] < 2:
                time.sleep(0.01)  # both replicas mid-job: whichever is killed holds one
            victim = replica_pids()[0]
            os.kill(victim, signal.SIGKILL)
            results = [f.result() for f in pending]
        pictures = [r for kind, r in results if kind == "ok"]
        errors = [r for kind, r in results if kind == "error"]
        assert all(p and len(p) > 100 for p in pictures)
        assert all(len(e) > 20 and "Internal Server Error" not in e for e in errors), errors  # said, not bare 500s
        rows = store._db.execute("SELECT status, attempts FROM jobs").fetchall()
        assert len(rows) == REQUESTS and all(status in ("succeeded", "failed") for status, _ in rows), rows
        assert sum(status == "succeeded" for status, _ in rows) == len(pictures)
        assert len(pictures) >= REQUESTS - 2  # the killed replica's job(s) are retried on the other one
        assert any(attempts == 2 for _, attempts in rows)  # the kill caught a job mid-run
        deadline = time.monotonic() + 120
        while len(replica_pids()) < 2 or victim in replica_pids():  # Ray restarts the replica
            assert time.monotonic() < deadline, "Ray did not restart the killed replica"
            time.sleep(1)
        # streaming through the ingress: the replica's partial images reach the client
        kinds = [event.type for event in client.images.generate(
            model="qimg-tiny", prompt="a red circle", size="128x128", stream=True, partial_images=2,
            extra_body={"steps": 6})]
        assert kinds.count("image_generation.partial_image") == 2 and kinds[-1] == "image_generation.completed"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        store.close()
