"""Several requests denoised as one batch give each request the picture it gets alone, bit for bit (the shipped
qimg-tiny, float32, CPU); requests that cannot share a batch run alone; a cancelled or refused request leaves the
others untouched. Then the server: queued jobs batched behind a busy worker (`BlockingImages` TEST DOUBLE)."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest
from PIL import Image

import qimg
from qimg.errors import Cancelled, InputError
from qimg.options import GenerateOptions

PROMPTS = ["a large red circle in the center on a blue background", "a green square",
           "the word HI in white on a black background with a small yellow triangle in the bottom right corner",
           "a blue circle in the top left corner"]


@pytest.fixture(scope="module")
def pipe():
    return qimg.load()


def same(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(x.mode == y.mode and x.size == y.size and x.tobytes() == y.tobytes()
                                    for x, y in zip(a, b))


def test_a_batch_gives_each_request_its_own_pictures(pipe):
    requests = [dict(prompt=PROMPTS[0], seed=1), dict(prompt=PROMPTS[1], seed=2, n=2),
                dict(prompt=PROMPTS[2], seed=3, background="opaque"), dict(prompt=PROMPTS[3], seed=4)]
    alone = [pipe.generate(**r) for r in requests]
    batched = pipe.generate_batch([GenerateOptions(**r) for r in requests])
    for r, a, b in zip(requests, alone, batched):
        assert same(a, b), r
        assert all(img.info["qimg"]["batch"] == 4 and img.info["qimg"]["seed"] == r["seed"] for img in b)
    assert len({img.tobytes() for out in batched for img in out}) == 5  # five different pictures


def test_edits_batch_too(pipe):
    base = pipe.generate(PROMPTS[0], seed=5)[0]
    other = pipe.generate(PROMPTS[3], seed=6)[0]
    requests = [dict(prompt="make the red circle green", images=[base], seed=1),
                dict(prompt="move the blue circle to the center", images=[other], seed=2)]
    alone = [pipe.generate(**r) for r in requests]
    batched = pipe.generate_batch([GenerateOptions(**r) for r in requests])
    assert all(same(a, b) for a, b in zip(alone, batched))
    assert batched[0][0].info["qimg"]["batch"] == 2


def test_what_cannot_share_a_batch_runs_alone(pipe):
    requests = [dict(prompt=PROMPTS[0], seed=1, width=128, height=128), dict(prompt=PROMPTS[1], seed=1, width=96,
                height=128), dict(prompt=PROMPTS[2], seed=1, steps=4), dict(prompt=PROMPTS[3], seed=1,
                sampler="dpmpp-2m"), dict(prompt=PROMPTS[0], seed=9, width=128, height=128)]
    alone = [pipe.generate(**r) for r in requests]
    batched = pipe.generate_batch([GenerateOptions(**r) for r in requests])
    assert all(same(a, b) for a, b in zip(alone, batched))
    batches = [out[0].info["qimg"].get("batch", 1) for out in batched]
    assert batches == [2, 1, 1, 1, 2]  # only the two 128x128 default-step Euler requests shared one


def test_a_cancelled_or_refused_request_leaves_the_others(pipe):
    calls = {"n": 0}

    def cancel_after_one_step():
        calls["n"] += 1
        return calls["n"] > 1

    requests = [GenerateOptions(prompt=PROMPTS[0], seed=1), GenerateOptions(prompt=PROMPTS[1], seed=2,
                                                                            cancel=cancel_after_one_step),
                GenerateOptions(prompt=PROMPTS[2], seed=3, width=8, height=8),  # refused by the model
                GenerateOptions(prompt=PROMPTS[3], seed=4)]
    out = pipe.generate_batch(requests)
    steps = pipe.describe()["default_steps"]
    assert isinstance(out[1], Cancelled) and f"after 1 of {steps} steps" in str(out[1])
    assert isinstance(out[2], InputError)
    assert same(out[0], pipe.generate(PROMPTS[0], seed=1)) and same(out[3], pipe.generate(PROMPTS[3], seed=4))
    assert out[0][0].info["qimg"]["batch"] == 3
    with pytest.raises(Cancelled, match="every request of the batch"):
        from qimg.pipelines.batching import run_batch

        run_batch(pipe, [pipe.plan(GenerateOptions(prompt=p, seed=1, cancel=lambda: True)) for p in PROMPTS[:2]])


def test_v1_runs_each_request_alone(ref_v1):
    ours = qimg.load(ref_v1["t2i"][1], dtype="float32", device="cpu")
    requests = [dict(prompt="a cat", seed=1, width=64, height=64, steps=2),
                dict(prompt="a dog on a red sofa", seed=2, width=64, height=64, steps=2)]
    batched = ours.generate_batch([GenerateOptions(**r) for r in requests])
    assert all(same(ours.generate(**r), b) for r, b in zip(requests, batched))
    assert all("batch" not in b[0].info["qimg"] for b in batched)


# -- the server ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def held_server(tmp_path, max_batch: int):
    """A server with the embedded model whose worker a `BlockingImages` job holds, so that jobs posted now queue
    up; yields (client, the blocker: `blocker.release.set()` lets the worker go on)."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx2")
    from tests.serve_support import BlockingImages, ServerThread, make_settings, wait_models_loaded

    blocker = BlockingImages()
    settings = make_settings(tmp_path / "data", models={"tiny": None}, max_batch=max_batch)
    with ServerThread(settings, pipelines={"blocker": blocker}) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        wait_models_loaded(srv.url)
        c.post("/v1/images/generations", json={"prompt": "hold", "model": "blocker"},
               headers={"Prefer": "respond-async"})
        assert blocker.started.wait(10)
        yield c, blocker


def test_queued_jobs_run_as_one_batch_with_their_own_pictures(tmp_path, pipe):
    with held_server(tmp_path, max_batch=3) as (c, blocker):
        bodies = [{"prompt": p, "model": "tiny", "seed": i, "size": "128x128"} for i, p in enumerate(PROMPTS)]
        bodies.append({"prompt": PROMPTS[0], "model": "tiny", "seed": 9, "size": "96x128"})  # another size
        ids = [c.post("/v1/images/generations", json=b, headers={"Prefer": "respond-async"}).json()["id"]
               for b in bodies]
        blocker.release.set()
        jobs = []
        for job_id in ids:
            deadline = time.monotonic() + 60
            while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            jobs.append(job)
        assert [j["status"] for j in jobs] == ["succeeded"] * 5
        assert [j["result"]["batch"] for j in jobs] == [3, 3, 3, 1, 1]  # max_batch 3; the 4th waited; 96x128 alone
        for body, job in zip(bodies, jobs):
            data = c.get(job["outputs"][0]["url"]).content
            served = Image.open(io.BytesIO(data))
            w, h = map(int, body["size"].split("x"))
            expected = pipe.generate(body["prompt"], seed=body["seed"], width=w, height=h)[0]
            assert np.array_equal(np.asarray(served), np.asarray(expected)), body


def test_a_job_cancelled_inside_a_batch_ends_at_once(tmp_path):
    with held_server(tmp_path, max_batch=4) as (c, blocker):
        ids = [c.post("/v1/images/generations", json={"prompt": p, "model": "tiny", "seed": i, "steps": 150,
                                                      "size": "128x128"},
                      headers={"Prefer": "respond-async"}).json()["id"] for i, p in enumerate(PROMPTS[:3])]
        blocker.release.set()
        deadline = time.monotonic() + 30
        while c.get(f"/v1/jobs/{ids[1]}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.delete(f"/v1/jobs/{ids[1]}").status_code == 202
        cancelled_at = time.monotonic()
        while (job := c.get(f"/v1/jobs/{ids[1]}").json())["status"] == "running":
            time.sleep(0.02)
        assert job["status"] == "cancelled" and time.monotonic() - cancelled_at < 5
        others = []
        for job_id in (ids[0], ids[2]):
            while (other := c.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
                time.sleep(0.05)
            others.append(other)
        assert [o["status"] for o in others] == ["succeeded"] * 2 and all(o["result"]["batch"] == 3 for o in others)
