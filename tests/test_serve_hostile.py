"""The service under hostile input: each defect found by the review, sent as the exact request that showed it, and the
bounds on memory, cost and time. Live uvicorn servers on 127.0.0.1 (threads of this process) with the tiny random
2.x checkpoint and `BlockingImages`, a TEST DOUBLE that holds the worker until released (see serve_support)."""

from __future__ import annotations

import gc
import io
import json
import os
import sqlite3
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")

from tests.serve_support import BlockingImages, ServerThread, make_settings, png_bytes, wait_models_loaded  # noqa

TIMEOUT = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from qimg.serve.settings import Limits

    limits = Limits(max_image_bytes=2 * 1024 * 1024, max_job_cost=400.0)
    settings = make_settings(tmp_path_factory.mktemp("hostile"), max_queue=24, limits=limits, job_timeout=30)
    blocker = BlockingImages()
    with ServerThread(settings, pipelines={"blocker": blocker}) as srv:
        wait_models_loaded(srv.url)
        srv.blocker = blocker
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def job_count(http) -> int:
    return len(http.get("/v1/jobs", params={"limit": 200}).json()["data"])


def error_of(r, status=400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


# -- 1. lone surrogates ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "user", "size", "model"])
def test_a_lone_surrogate_is_refused_and_the_history_still_reads(http, field):
    body = {"prompt": "a b", "size": "128x128", "steps": 1}
    body[field] = "a \ud800 b"
    before = job_count(http)
    raw = json.dumps(body)  # JSON carries the escape: "a \\ud800 b"
    assert "\\ud800" in raw
    err = error_of(http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"}))
    assert err["param"] == field and "lone UTF-16 surrogate (U+D800) at character 2" in err["message"]
    assert job_count(http) == before  # no job behind a refused request
    assert http.get("/v1/jobs").status_code == 200


def test_a_lone_surrogate_in_a_form_field_and_in_lora_names(http):
    r = http.post("/v1/images/edits", data={"prompt": "x", "loras": json.dumps([{"name": "\udfff"}])},
                  files={"image": ("a.png", png_bytes(), "image/png")})
    assert error_of(r)["param"] == "loras.0.name"
    raw = b'{"prompt": "x", "loras": [{"name": "\\udc80", "scale": 1}]}'
    r = http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert "lone UTF-16 surrogate (U+DC80)" in error_of(r)["message"]


def test_rows_stored_with_unencodable_text_read_back_escaped(tmp_path):
    """A job row written before requests were checked (a surrogate in its params and error, a NaN) is served
    escaped, by the list and by id, also after a restart."""
    settings = make_settings(tmp_path / "data")
    with ServerThread(settings) as srv:
        wait_models_loaded(srv.url)
    db = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")
    job_id = "job_" + "a" * 32
    params = json.dumps({"prompt": "a \ud800 b", "width": 64, "height": 64, "scheduler": {"shift": float("nan")}})
    db.execute("INSERT INTO jobs (id, kind, status, model, params, error, error_type, created_at, finished_at) "
               "VALUES (?, 'generate', 'failed', 'tiny', ?, ?, 'internal_error', 1.0, 2.0)",
               (job_id, params, "bad \\ud800 text"))
    db.commit()
    db.close()
    with ServerThread(make_settings(tmp_path / "data")) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        listed = c.get("/v1/jobs")
        assert listed.status_code == 200
        one = c.get(f"/v1/jobs/{job_id}")
        assert one.status_code == 200
        assert one.json()["params"]["prompt"] == "a \\ud800 b"  # the escape, as text
        assert one.json()["params"]["scheduler"] == {"shift": "nan"}  # NaN is not JSON: written out
        assert [j["id"] for j in listed.json()["data"]] == [job_id]


# -- 2. queued uploads hold no pixels ------------------------------------------------------------------------------
def one_bit_png(side=4090) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def rss_mb() -> float:
    psutil = pytest.importorskip("psutil")
    return psutil.Process().memory_info().rss / 2**20


def test_queued_edits_hold_no_decoded_pictures(http, server):
    """20 edits of 10 one-bit 4090x4090 PNGs each (2 KB files, 167 M pixels decoded per request) wait behind a job
    that holds the worker: the server grows by less than 300 MB (it was about 650 MB per request)."""
    blocker = server.blocker
    blocker.release.clear()
    hold = http.post("/v1/images/generations", json={"prompt": "hold", "model": "blocker"},
                     headers={"Prefer": "respond-async"}).json()["id"]
    assert blocker.started.wait(10)
    data = one_bit_png()
    assert len(data) < 40_000
    files = [("image", (f"{i}.png", data, "image/png")) for i in range(10)]
    gc.collect()
    before = rss_mb()
    queued = []
    for _ in range(20):
        r = http.post("/v1/images/edits", data={"prompt": "x", "model": "tiny", "size": "64x64", "steps": "1"},
                      files=files, headers={"Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        queued.append(r.json()["id"])
    gc.collect()
    grown = rss_mb() - before
    print(f"RSS grew by {grown:.0f} MB for 20 queued edits")
    try:
        assert grown < 300, f"RSS grew by {grown:.0f} MB for 20 queued edits"
        assert all(http.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in queued)
    finally:
        for job_id in queued:
            http.delete(f"/v1/jobs/{job_id}")
        blocker.release.set()
        wait_status(http, hold, ("succeeded",))


def wait_status(http, job_id, statuses, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not reach {statuses}: {job}")


# -- 3. JSON bodies are small ----------------------------------------------------------------------------------------
def test_a_large_json_body_is_refused_before_it_is_read(http):
    body = json.dumps({"prompt": "x" * (3 * 1024 * 1024)})
    start = time.perf_counter()
    err = error_of(http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"}),
                   413)
    assert "limit for a JSON body is 1,048,576" in err["message"]
    assert time.perf_counter() - start < 5
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("body,message", [
    (b"", "the request body is empty"),
    (b"   ", "the request body is empty"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"prompt": ', "not valid JSON"),
    (b'{"prompt": "\xff"}', "not UTF-8 text: invalid start byte at byte 12"),
    (b'{"prompt": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "x", "sigmas": ' + b"[" * 20 + b"]" * 20 + b"}", "nested 21 levels deep; the limit is 16"),
])
def test_unreadable_json_bodies(http, body, message):
    r = http.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert message in error_of(r)["message"]


def test_json_sent_to_a_form_route_and_a_form_to_a_json_route(http):
    err = error_of(http.post("/v1/images/edits", json={"prompt": "x"}))
    assert "takes a multipart/form-data body" in err["message"] and "'application/json'" in err["message"]
    err = error_of(http.post("/v1/images/generations", data={"prompt": "x"},
                             files={"image": ("a.png", png_bytes(), "image/png")}))
    assert "takes a JSON body" in err["message"]


# -- 4. cost and time ----------------------------------------------------------------------------------------------
def test_a_job_over_the_budget_is_refused_with_the_figure_and_the_limit(http):
    before = job_count(http)
    r = http.post("/v1/images/generations", json={"prompt": "x", "size": "1024x1024", "steps": 1000, "n": 4,
                                                  "model": "tiny"})
    err = error_of(r)
    assert err["code"] == "job_too_expensive"
    assert "4,194 megapixel-steps (1000 steps x 1.049 Mpx (1024x1024) x n 4" in err["message"]
    assert "limit is 400" in err["message"]
    r = http.post("/v1/images/edits", data={"prompt": "x", "size": "512x512", "steps": "400", "model": "tiny"},
                  files=[("image", ("a.png", png_bytes(), "image/png"))] * 3)
    assert "x 4 frames (the output and 3 condition images)" in error_of(r)["message"]
    r = http.post("/v1/images/generations", json={"prompt": "x", "size": "4096x4096", "steps": 1000, "n": 10,
                                                  "model": "tiny"})  # the request of the review
    assert "167,772 megapixel-steps" in error_of(r)["message"]
    assert job_count(http) == before


def test_the_budget_is_checked_when_the_model_was_not_loaded(tmp_path):
    from qimg.serve.settings import Limits

    settings = make_settings(tmp_path / "data", preload=False, limits=Limits(max_job_cost=1.0))
    with ServerThread(settings) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "256x256", "steps": 20})
        err = error_of(r)  # the job ran, planned, and failed before its first step
        assert err["code"] == "job_too_expensive"
        job = c.get(f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
        assert job["status"] == "failed" and "megapixel-steps" in job["error"]["message"]


def test_a_job_past_the_time_limit_is_stopped(tmp_path):
    blocker = BlockingImages()
    settings = make_settings(tmp_path / "data", job_timeout=0.5)
    with ServerThread(settings, pipelines={"blocker": blocker}) as srv, \
            httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        wait_models_loaded(srv.url)
        start = time.perf_counter()
        r = c.post("/v1/images/generations", json={"prompt": "x", "model": "blocker"})
        assert time.perf_counter() - start < 5
        err = error_of(r, 408)
        assert err["code"] == "job_timeout" and "limit of 0.5 s per job" in err["message"]
        assert r.headers["x-should-retry"] == "false"
        job = c.get(f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
        assert job["status"] == "failed" and job["error"]["type"] == "job_timeout"


def test_a_client_that_disconnects_cancels_its_job(http, server):
    blocker = server.blocker
    blocker.release.clear()
    blocker.started.clear()
    with httpx.Client(base_url=server.url, timeout=1.0) as short:
        with pytest.raises(httpx.ReadTimeout):
            short.post("/v1/images/generations", json={"prompt": "x", "model": "blocker"})
    job = http.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert job["params"]["prompt"] == "x"
    done = wait_status(http, job["id"], ("cancelled",), timeout=5)
    assert "the client disconnected" in done["error"]["message"]
    # streamed: the same
    blocker.started.clear()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        with c.stream("POST", "/v1/images/generations", json={"prompt": "y", "model": "blocker", "stream": True}) as r:
            assert r.status_code == 200
            job_id = r.headers["x-qimg-job-id"]
            assert blocker.started.wait(10)
    done = wait_status(http, job_id, ("cancelled",), timeout=5)
    assert "the client disconnected" in done["error"]["message"]
    blocker.release.set()


# -- 5. smaller ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "steps": 2.0}, "steps"),
    ({"prompt": "x", "seed": "3"}, "seed"),
    ({"prompt": 5}, "prompt"),
])
def test_json_types_are_strict(http, body, param):
    assert error_of(http.post("/v1/images/generations", json=body))["param"] == param


def test_form_fields_are_converted(http):
    r = http.post("/v1/images/edits", data={"prompt": "x", "n": "true", "model": "tiny"},
                  files={"image": ("a.png", png_bytes(), "image/png")})
    assert error_of(r)["param"] == "n"


def test_an_oversized_upload_names_its_size(http):
    big = png_bytes() + b"\0" * (3 * 1024 * 1024)
    err = error_of(http.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big, "image/png")}))
    assert err["code"] == "image_too_large" and "is 3.0 MiB; the limit is 2 MiB" in err["message"]


def test_a_long_form_field(http):
    err = error_of(http.post("/v1/images/edits", data={"prompt": "x" * 200_000},
                             files={"image": ("a.png", png_bytes(), "image/png")}))
    assert "a text field may hold at most 132,096 bytes; prompts at most 32,000 characters" in err["message"]


def test_head_of_a_stored_file(http):
    r = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1, "model": "tiny",
                                                  "response_format": "url"})
    url = r.json()["data"][0]["url"]
    head, get = http.head(url), http.get(url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(get.content) > 0


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    import subprocess
    import sys

    from qimg.atomic import atomic_write

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.png.{int(gone.stdout)}.abc123.tmp"
    alive = tmp_path / f".out.png.{os.getppid()}.def456.tmp"  # a running process's write in progress
    other = tmp_path / f".other.png.{int(gone.stdout)}.x.tmp"
    for path in (dead, alive, other):
        path.write_bytes(b"partial")
    with atomic_write(tmp_path / "out.png") as handle:
        handle.write(b"done")
    assert not dead.exists() and alive.exists() and other.exists()
    assert (tmp_path / "out.png").read_bytes() == b"done"


# -- found by bench/serve_attack.py ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,message", [
    (b'{"prompt": "x", "scheduler_config": {"shift": NaN}}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "guidance_scale": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "integer string conversion"),
    (b'{"prompt": "x", "scheduler_config": {"shift": "abc"}}', "shift must be a number in (0, 1000], got 'abc'"),
    (b'{"prompt": "x", "scheduler_config": {"use_dynamic_shifting": "yes"}}', "must be true or false, got 'yes'"),
    (b'{"prompt": "x", "scheduler_config": "{}"}', "invalid value for 'scheduler_config'"),
])
def test_numbers_and_scheduler_values_are_checked_at_entry(http, raw, message):
    before = job_count(http)
    r = http.post("/v1/images/generations", content=raw, headers={"content-type": "application/json"})
    assert message in error_of(r)["message"]
    assert job_count(http) == before and http.get("/v1/jobs").status_code == 200


def test_form_values_and_names(http):
    r = http.post("/v1/images/edits", data={"prompt": "x", "guidance_scale": "nan"},
                  files={"image": ("a.png", png_bytes(), "image/png")})
    assert "finite number" in error_of(r)["message"]
    r = http.post("/v1/images/edits", data={"prompt": "x", "": "1"},
                  files={"image": ("a.png", png_bytes(), "image/png")})
    assert "unknown parameter: '' (an empty name)" in error_of(r)["message"]


def test_an_edit_of_a_sliver_is_refused(http):
    r = http.post("/v1/images/edits", data={"prompt": "x", "model": "tiny", "size": "64x64", "steps": "1"},
                  files={"image": ("a.png", png_bytes(4096, 1), "image/png")})
    assert "image 1 is 4096x1" in error_of(r)["message"] and "aspect ratio is too extreme" in error_of(r)["message"]


def test_byte_ranges_of_a_file(http):
    r = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1, "model": "tiny",
                                                  "response_format": "url"})
    url = r.json()["data"][0]["url"]
    whole = http.get(url).content
    part = http.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == whole[:10]
    for header in ("bytes=abc", "bytes=10-5", "items=0-1", "bytes=0-" + "9" * 5000, "bytes=-"):
        assert error_of(http.get(url, headers={"Range": header}))["code"] == "invalid_range", header
    far = http.get(url, headers={"Range": "bytes=100000000-100000010"})
    assert error_of(far, 416)["code"] == "range_not_satisfiable"
    assert far.headers["content-range"] == f"bytes */{len(whole)}"


def test_a_long_step_stops_between_blocks(tmp_path):
    """The time limit is polled before every transformer block, not only between steps: a 1024x1024 step of the
    embedded model stops inside the step."""
    settings = make_settings(tmp_path / "data", models={"tiny": None}, job_timeout=0.2)
    with ServerThread(settings) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as c:
        wait_models_loaded(srv.url)
        r = c.post("/v1/images/generations", json={"prompt": "a red circle", "size": "1024x1024", "steps": 1})
        err = error_of(r, 408)
        assert "between transformer blocks" in err["message"], err


def test_serve_flags_for_budgets_batching_and_low_bit(tmp_path):
    from qimg.cli import build_parser
    from qimg.cli.serve import settings_from_args
    from qimg.errors import InputError

    parser = build_parser()
    settings = settings_from_args(parser.parse_args(["serve", "--data-dir", str(tmp_path), "--max-batch", "4",
                                                     "--batch-megapixels", "2", "--job-timeout", "0",
                                                     "--max-job-cost", "50", "--quantize", "fp8"]))
    assert settings.max_batch == 4 and settings.batch_megapixels == 2 and settings.job_timeout is None
    assert settings.limits.max_job_cost == 50 and settings.load.quantize == "fp8"
    with pytest.raises(InputError, match="give exactly one --model"):
        settings_from_args(parser.parse_args(["serve", "--data-dir", str(tmp_path), "--transformer", "t.gguf"]))
    with pytest.raises(InputError, match="--max-batch must be >= 1"):
        settings_from_args(parser.parse_args(["serve", "--data-dir", str(tmp_path), "--max-batch", "0"]))
