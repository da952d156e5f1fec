"""Crash recovery: `qimg serve` in a subprocess is SIGKILLed while a job runs, then started again on the same
data directory. The running job must be terminal (failed, with the reason), the jobs that were queued must run
with the parameters and input pictures they were submitted with, finished outputs still be served, and no partial
or stray files be left behind. With `--no-requeue` queued jobs are failed instead.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

from PIL import Image  # noqa: E402

from tests.serve_support import ServerProcess  # noqa: E402


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
            waiting = c.post("/v1/images/generations",
                             json={"prompt": "queued at the kill", "size": "64x96", "steps": 2, "seed": 5,
                                   "guidance_scale": 1.5, "negative_prompt": "grey", "sampler": "dpmpp-2m"},
                             headers={"Prefer": "respond-async"}).json()["id"]
            picture = io.BytesIO()
            Image.new("RGB", (30, 90), (200, 30, 30)).save(picture, format="PNG")
            waiting_edit = c.post("/v1/images/edits", data={"prompt": "an edit queued at the kill", "steps": "2",
                                                            "seed": "6", "output_format": "webp"},
                                  files={"image": ("in.png", picture.getvalue(), "image/png")},
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
    assert status[slow_id] == "running" and status[done_id] == "succeeded"
    assert status[waiting] == status[waiting_edit] == "queued"

    second = ServerProcess(data).start()
    try:
        with httpx.Client(base_url=second.url, timeout=120) as c:
            job = c.get(f"/v1/jobs/{slow_id}").json()
            assert job["status"] == "failed" and job["error"]["type"] == "server_restart"
            assert "stopped while this job was running" in job["error"]["message"]
            assert job["outputs"] == [] and job["finished_at"] is not None
            # the queued jobs run again, as submitted
            for job_id in (waiting, waiting_edit):
                job = wait_terminal(c, job_id)
                assert job["status"] == "succeeded", job
            job = c.get(f"/v1/jobs/{waiting}").json()
            meta = json.loads(Image.open(io.BytesIO(c.get(job["outputs"][0]["url"]).content)).text["qimg"])
            assert (meta["prompt"], meta["seed"], meta["steps"], meta["cfg"], meta["negative_prompt"]) == \
                ("queued at the kill", 5, 2, 1.5, "grey")
            assert (meta["width"], meta["height"], meta["images"], meta["sampler"]) == (64, 96, 0, "dpmpp-2m")
            edit = c.get(f"/v1/jobs/{waiting_edit}").json()
            assert edit["outputs"][0]["mime"] == "image/webp" and len(edit["inputs"]) == 1
            out = Image.open(io.BytesIO(c.get(edit["outputs"][0]["url"]).content))
            assert out.format == "WEBP" and out.size[0] < out.size[1]  # the portrait input's aspect
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


def wait_terminal(client, job_id, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not finish: {job}")


def test_queued_jobs_at_start_no_requeue_and_unrebuildable(tmp_path):
    """Rows a previous process left queued: with requeue off they are failed; with it on, one whose input picture
    is gone fails with the reason while the others run."""
    from qimg.serve.store_sqlite import SQLiteJobStore
    from tests.serve_support import ServerThread, make_settings, wait_models_loaded

    def leave_queued(data, job_id, kind, params):
        data.mkdir(parents=True, exist_ok=True)
        store = SQLiteJobStore(data / "jobs.sqlite3")
        store.create(job_id, kind, "tiny", params)
        store.close()

    params = {"prompt": "left queued", "n": 1, "size": "64x64", "steps": 1, "seed": 1, "images": 0}
    off = tmp_path / "off"
    leave_queued(off, "job_" + "1" * 32, "generate", params)
    with ServerThread(make_settings(off, requeue=False)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        job = c.get("/v1/jobs/job_" + "1" * 32).json()
        assert job["status"] == "failed" and job["error"]["type"] == "server_restart"
        assert "before this job started" in job["error"]["message"]

    on = tmp_path / "on"
    leave_queued(on, "job_" + "2" * 32, "edit", {**params, "images": 1})  # its input file was never stored
    leave_queued(on, "job_" + "3" * 32, "generate", params)
    with ServerThread(make_settings(on)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_models_loaded(srv.url)
        broken = c.get("/v1/jobs/job_" + "2" * 32).json()
        assert broken["status"] == "failed" and "could not be queued again" in broken["error"]["message"]
        assert "1 input pictures were recorded, 0 are stored" in broken["error"]["message"]
        assert wait_terminal(c, "job_" + "3" * 32)["status"] == "succeeded"


def test_graceful_stop_keeps_queued_jobs_for_the_next_start(tmp_path):
    from tests.serve_support import FakeLayered, ServerThread, make_settings, png_bytes, wait_models_loaded

    data = tmp_path / "data"
    image = {"image": ("in.png", png_bytes(32, 32), "image/png")}
    async_ = {"Prefer": "respond-async"}
    with ServerThread(make_settings(data, models={}), pipelines={"double": FakeLayered(step_seconds=0.1)}) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_models_loaded(srv.url)
        running = c.post("/v1/images/layers", data={"steps": "200"}, files=image, headers=async_).json()["id"]
        queued = c.post("/v1/images/layers", data={"layers": "3", "steps": "2", "guidance_scale": "2"}, files=image,
                        headers=async_).json()["id"]
        while c.get(f"/v1/jobs/{running}").json()["status"] != "running":
            time.sleep(0.05)
    double = FakeLayered()
    with ServerThread(make_settings(data, models={}), pipelines={"double": double}) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        stopped = c.get(f"/v1/jobs/{running}").json()
        assert stopped["status"] == "failed" and stopped["error"]["type"] in ("server_shutdown", "server_restart")
        job = wait_terminal(c, queued)
        assert job["status"] == "succeeded" and len(job["outputs"]) == 3
        assert double.calls == [{"layers": 3, "resolution": None, "prompt": None, "steps": 2, "cfg": 2.0,
                                 "negative_prompt": None, "cfg_normalize": False, "recurse": None,
                                 "caption_language": "en"}]
