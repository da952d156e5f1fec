"""Crash recovery: `qimg serve` in a subprocess is SIGKILLed while a job runs, then started again on the same
data directory. The running job must be terminal (failed, with the reason), finished outputs still served, and
no partial or stray files left behind.
"""

from __future__ import annotations

import io
import os
import sqlite3
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

from PIL import Image  # noqa: E402

from tests.test_serve_support import ServerProcess  # noqa: E402


def test_sigkill_while_running_then_restart(tmp_path):
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        with httpx.Client(base_url=first.url, timeout=120) as c:
            done = c.post("/v1/images/generations",
                          json={"prompt": "kept", "size": "64x64", "steps": 2, "response_format": "url"})
            assert done.status_code == 200, done.text
            kept_url = done.json()["data"][0]["url"]
            kept_path = kept_url.split(str(first.port), 1)[1]
            kept_bytes = c.get(kept_url).content
            done_id = done.headers["x-qimg-job-id"]
            slow = c.post("/v1/images/generations", json={"prompt": "killed", "size": "64x64", "steps": 1000, "n": 2},
                          headers={"Prefer": "respond-async"})
            assert slow.status_code == 202
            slow_id = slow.json()["id"]
            waiting = c.post("/v1/images/generations", json={"prompt": "never ran", "size": "64x64", "steps": 2},
                             headers={"Prefer": "respond-async"}).json()["id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{slow_id}").json()
                if job["status"] == "running" and (job["progress"] or {}).get("step", 0) >= 2:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"the slow job did not run: {job}")
    finally:
        first.kill()

    # right after the kill: the database still says running (nothing cleaned up)
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        status = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert status[slow_id] == "running" and status[waiting] == "queued" and status[done_id] == "succeeded"

    second = ServerProcess(data).start()
    try:
        with httpx.Client(base_url=second.url, timeout=120) as c:
            job = c.get(f"/v1/jobs/{slow_id}").json()
            assert job["status"] == "failed" and job["error"]["type"] == "server_restart"
            assert "stopped while this job was running" in job["error"]["message"]
            assert job["outputs"] == [] and job["finished_at"] is not None
            never = c.get(f"/v1/jobs/{waiting}").json()
            assert never["status"] == "failed" and "before this job started" in never["error"]["message"]
            kept = c.get(f"/v1/jobs/{done_id}").json()
            assert kept["status"] == "succeeded"
            r = c.get(kept_path)
            assert r.status_code == 200 and r.content == kept_bytes
            # the restarted server works
            again = c.post("/v1/images/generations", json={"prompt": "after", "size": "64x64", "steps": 1})
            assert again.status_code == 200
            listed = [j["status"] for j in c.get("/v1/jobs").json()["data"]]
            assert "running" not in listed and "queued" not in listed
    finally:
        second.stop()
    # no partial files: every stored file is indexed, complete and readable; no temporaries
    names = sorted(os.listdir(data / "files"))
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        indexed = {row[0] for row in db.execute("SELECT name FROM files")}
    assert set(names) == indexed
    for name in names:
        if name.endswith(".png"):
            Image.open(io.BytesIO((data / "files" / name).read_bytes())).load()
