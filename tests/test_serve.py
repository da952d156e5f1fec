"""The HTTP server against live uvicorn servers on 127.0.0.1 (threads of this process), with the tiny random
Qwen-Image 2.x checkpoint and, for /v1/images/layers, the `FakeLayered` TEST DOUBLE (see serve_support: it
stands in for the Layered pipeline, which is written elsewhere; the route code under test is the real one).

The official `openai` client drives the OpenAI-compatible routes.
"""

from __future__ import annotations

import base64
import http.client as httpclient
import io
import json
import struct
import threading
import time
import zlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from PIL import Image  # noqa: E402

from tests.serve_support import (FakeLayered, ServerThread, make_settings, png_bytes,  # noqa: E402
                                      wait_models_loaded)

TIMEOUT = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("serve-data"), preview_interval=0.0, max_queue=8)
    double = FakeLayered()
    with ServerThread(settings, pipelines={"layers-double": double}) as srv:
        wait_models_loaded(srv.url)
        srv.layers_double = double
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def submit_async(http, steps: int, **extra) -> str:
    """A generation that answers at once (Prefer: respond-async); returns the job id."""
    r = http.post("/v1/images/generations", json={"prompt": "slow", "size": "64x64", "steps": steps, **extra},
                  headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    assert r.headers["x-qimg-job-id"] == r.json()["id"]
    return r.json()["id"]


def wait_status(http, job_id: str, statuses, timeout=60.0, min_step=0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        step = (job.get("progress") or {}).get("step") or 0
        if job["status"] in statuses and (job["status"] != "running" or step >= min_step):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not reach {statuses}: {job}")


# -- health, models --------------------------------------------------------------------------------------------
def test_health_and_models(http, client):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["models"] == {"tiny": "loaded", "layers-double": "loaded"}
    assert health["auth"] is False
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "layers-double"}
    raw = http.get("/v1/models").json()["data"]
    tasks = {m["id"]: m["tasks"] for m in raw}
    assert tasks == {"tiny": ["generate", "edit"], "layers-double": ["layers"]}


# -- generations ------------------------------------------------------------------------------------------------
def test_generate_b64(client, http):
    raw = client.images.with_raw_response.generate(prompt="a red circle", size="64x64",
                                                  extra_body={"seed": 7, "steps": 2})
    job_id = raw.headers["x-qimg-job-id"]
    result = raw.parse()
    assert len(result.data) == 1 and result.data[0].url is None
    img = decode(result.data[0].b64_json)
    assert img.format == "PNG" and img.size == (64, 64)
    meta = json.loads(img.text["qimg"])
    assert meta["seed"] == 7 and meta["steps"] == 2 and meta["job_id"] == job_id
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["kind"] == "generate" and job["model"] == "tiny"
    assert job["params"]["prompt"] == "a red circle" and job["params"]["seed"] == 7
    assert job["timings"]["run_s"] is not None and len(job["outputs"]) == 1
    # same seed, same picture
    again = client.images.generate(prompt="a red circle", size="64x64", extra_body={"seed": 7, "steps": 2})
    assert decode(again.data[0].b64_json).tobytes() == img.tobytes()


def test_sampling_extras_reach_the_pipeline_and_the_record(client, http, server):
    """sampler, sigmas, scheduler_config, shift and cfg_normalize travel through extra_body into the library's
    GenerateOptions; the picture is the library's for the same options, and the job records them."""
    import qimg
    from tests.serve_support import reference_checkpoint

    extra = {"seed": 3, "sampler": "dpmpp-2m", "sigmas": [1.0, 0.7, 0.4], "scheduler_config": {"max_shift": 1.2},
             "shift": 2.0, "guidance_scale": 2.0, "cfg_normalize": True}
    raw = client.images.with_raw_response.generate(prompt="a red circle", size="64x64", extra_body=extra)
    img = decode(raw.parse().data[0].b64_json)
    meta = json.loads(img.text["qimg"])
    assert meta["sampler"] == "dpmpp-2m" and meta["steps"] == 3 and meta["shift"] == 2.0
    job = http.get(f"/v1/jobs/{raw.headers['x-qimg-job-id']}").json()
    params = job["params"]
    assert params["sampler"] == "dpmpp-2m" and params["sigmas"] == [1.0, 0.7, 0.4] and params["cfg"] == 2.0
    assert params["scheduler"] == {"max_shift": 1.2} and params["cfg_normalize"] is True and params["width"] == 64
    pipe = qimg.load(reference_checkpoint(), dtype="float32", device="cpu")
    expected = pipe.generate("a red circle", width=64, height=64, seed=3, sampler="dpmpp-2m", sigmas=[1.0, 0.7, 0.4],
                             scheduler={"max_shift": 1.2}, shift=2.0, cfg=2.0, cfg_normalize=True)[0]
    assert img.tobytes() == expected.tobytes()
    for bad, message in (({"sampler": "ddim"}, "sampler must be one of"), ({"preset": "x"}, "preset must be one of"),
                         ({"scheduler_config": {"frobnicate": 1}}, "frobnicate"),
                         ({"sigmas": [1.0, 2.0]}, r"sigmas must lie in \(0, 1\]")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.images.generate(prompt="x", size="64x64", extra_body=bad)


def test_generate_url_and_formats(client, http):
    result = client.images.generate(prompt="blue", n=2, size="64x64", response_format="url", output_format="jpeg",
                                    extra_body={"steps": 2, "negative_prompt": "red", "guidance_scale": 2.0})
    assert len(result.data) == 2 and result.output_format == "jpeg"
    for item in result.data:
        assert item.b64_json is None and "/v1/files/file_" in item.url
        r = http.get(item.url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    webp = client.images.generate(prompt="x", size="64x64", output_format="webp", background="opaque",
                                  extra_body={"steps": 1})
    assert decode(webp.data[0].b64_json).format == "WEBP"


def test_generate_default_size_and_aliases(client, http):
    """No size: the checkpoint's default; the diffusers names num_inference_steps / true_cfg_scale reach the job."""
    raw = client.images.with_raw_response.generate(prompt="defaults", extra_body={"num_inference_steps": 1,
                                                                                  "true_cfg_scale": 1.5})
    result = raw.parse()
    assert result.size == "64x64"  # the checkpoint's default resolution
    job = http.get(f"/v1/jobs/{raw.headers['x-qimg-job-id']}").json()
    assert job["params"]["steps"] == 1 and job["params"]["cfg"] == 1.5 and job["result"]["steps"] == 1
    meta = json.loads(decode(result.data[0].b64_json).text["qimg"])
    assert meta["steps"] == 1 and meta["cfg"] == 1.5


def test_bad_size(client, http):
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="big")
    assert "size must be 'auto' or WIDTHxHEIGHT" in err.value.message
    assert err.value.body["param"] == "size" and err.value.body["type"] == "invalid_request_error"
    # a well-formed size the loaded model refuses: a 400 with the pipeline's message, and no job
    before = http.get("/v1/jobs").json()["data"]
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="100000x64")
    assert "width 100000 is out of range" in err.value.message
    assert "x-qimg-job-id" not in err.value.response.headers
    assert http.get("/v1/jobs").json()["data"] == before


def test_validation_errors_are_400_in_openai_shape(http):
    cases = [({}, "prompt", "missing required parameter"),
             ({"prompt": "x", "colour": "red"}, "colour", "unknown parameter"),
             ({"prompt": "x", "n": 0}, "n", "invalid value"),
             ({"prompt": "x", "n": 11}, "n", "the limit is 10"),
             ({"prompt": "x", "response_format": "gif"}, "response_format", "invalid value"),
             ({"prompt": "x", "background": "transparent", "output_format": "jpeg"}, "background", "png"),
             ({"prompt": "x" * 32001}, "prompt", "the limit is 32000"),
             ({"prompt": "x", "model": "dall-e-3"}, "model", "not served here"),
             ({"prompt": "x", "model": "layers-double"}, "model", "does not do 'generate'")]
    for body, param, text in cases:
        r = http.post("/v1/images/generations", json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and text in error["message"], (body, error)
        assert "x-qimg-job-id" not in r.headers
    r = http.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# -- edits ----------------------------------------------------------------------------------------------------------
def test_edit_one_and_two_images(client, http):
    one = client.images.with_raw_response.edit(image=("a.png", png_bytes(), "image/png"), prompt="make it blue",
                                               size="64x64", extra_body={"steps": 2, "seed": 1})
    assert decode(one.parse().data[0].b64_json).size == (64, 64)
    job = http.get(f"/v1/jobs/{one.headers['x-qimg-job-id']}").json()
    assert job["kind"] == "edit" and job["params"]["images"] == 1 and len(job["inputs"]) == 1
    two = client.images.edit(image=[("a.png", png_bytes(), "image/png"),
                                    ("b.jpg", png_bytes(colour=(0, 0, 200), fmt="JPEG"), "image/jpeg")],
                             prompt="put them together", size="64x64", response_format="url",
                             extra_body={"steps": 2})
    assert http.get(two.data[0].url).status_code == 200
    newest = http.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert newest["params"]["images"] == 2 and len(newest["inputs"]) == 2
    # size auto: follows the (last) input's aspect at the default resolution
    auto = client.images.edit(image=("w.png", png_bytes(96, 48), "image/png"), prompt="wide",
                              extra_body={"steps": 1})
    w, h = (int(v) for v in auto.size.split("x"))
    assert w > h


def test_edit_rejects_mask_and_missing_image(http):
    r = http.post("/v1/images/edits", data={"prompt": "x"},
                  files={"image": ("a.png", png_bytes(), "image/png"), "mask": ("m.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "mask_not_supported"
    r = http.post("/v1/images/edits", data={"prompt": "x"}, files={"other": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and "unexpected file" in r.json()["error"]["message"]
    r = http.post("/v1/images/edits", data={"prompt": "x", "image": "https://example.invalid/a.png"})
    assert r.status_code == 400 and "must be an uploaded file" in r.json()["error"]["message"]


# -- streaming ------------------------------------------------------------------------------------------------------
def test_stream_partial_images(client):
    events = list(client.images.generate(prompt="stream", size="64x64", stream=True, partial_images=2,
                                         extra_body={"steps": 6}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        assert decode(e.b64_json).size == (64, 64)
    assert events[-1].usage is not None and events[-1].output_format == "png"

    edit_events = list(client.images.edit(image=("a.png", png_bytes(), "image/png"), prompt="edit stream",
                                          size="64x64", stream=True, partial_images=1, extra_body={"steps": 4}))
    assert [e.type for e in edit_events] == ["image_edit.partial_image", "image_edit.completed"]
    none = list(client.images.generate(prompt="no partials", size="64x64", stream=True, extra_body={"steps": 2}))
    assert [e.type for e in none] == ["image_generation.completed"]


def test_stream_error_is_raised(client):
    with pytest.raises(openai.APIError) as err:
        list(client.images.generate(prompt="x", size="100000x64", stream=True))
    assert "out of range" in str(err.value)


# -- jobs -------------------------------------------------------------------------------------------------------------
def test_jobs_list_newest_first_and_paging(http):
    ids = [submit_async(http, 1) for _ in range(3)]
    for job_id in ids:
        wait_status(http, job_id, ("succeeded",))
    listed = http.get("/v1/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in listed["data"]] == ids[::-1] and listed["has_more"]
    assert all(j["status"] == "succeeded" for j in listed["data"])
    page = http.get("/v1/jobs", params={"limit": 2, "before": ids[-1]}).json()
    assert [j["id"] for j in page["data"]] == ids[-2::-1]
    assert http.get("/v1/jobs/job_" + "0" * 32).status_code == 404
    assert http.get("/v1/jobs/nope").status_code == 400


def read_sse(response):
    event, data = "message", []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


def test_job_events_stream(http):
    job_id = submit_async(http, 12)
    events = []
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for event, payload in read_sse(r):
            events.append((event, payload))
            if event == "done":
                break
    assert events[0][0] == "status" and events[-1][0] == "done"
    assert events[-1][1]["job"]["status"] == "succeeded"
    steps = [p for e, p in events if e == "progress" and p["stage"] == "denoise"]
    assert steps and steps[-1]["step"] == steps[-1]["total"] == 12
    assert [p["step"] for p in steps] == sorted(p["step"] for p in steps)
    assert any(p["eta"] is not None for p in steps)
    previews = [p["preview"] for p in steps if p.get("preview")]
    assert previews and decode(previews[0]).format == "PNG"
    # a finished job: status then done at once
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert [e for e, _ in read_sse(r)] == ["status", "done"]


def test_cancel_running_and_queued(http):
    running = submit_async(http, 1000)
    wait_status(http, running, ("running",), min_step=1)
    queued = submit_async(http, 1000)
    r = http.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = http.delete(f"/v1/jobs/{running}")
    assert r.status_code == 202 and r.json()["cancel"] == "stopping"
    job = wait_status(http, running, ("cancelled", "failed", "succeeded"), timeout=30)
    assert job["status"] == "cancelled" and "cancelled" in job["error"]["message"]
    assert job["outputs"] == []
    r = http.delete(f"/v1/jobs/{running}")
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]


def test_cancel_a_waiting_request(http, server):
    """A synchronous request whose job is cancelled gets 409 with its job id."""
    out = {}

    def call():
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
            out["r"] = c.post("/v1/images/generations", json={"prompt": "long", "size": "64x64", "steps": 1000})

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    job = None
    while time.monotonic() < deadline:
        newest = http.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
        if newest["params"]["prompt"] == "long" and newest["status"] == "running":
            job = newest
            break
        time.sleep(0.05)
    assert job is not None
    http.delete(f"/v1/jobs/{job['id']}")
    thread.join(30)
    r = out["r"]
    assert r.status_code == 409 and r.headers["x-qimg-job-id"] == job["id"]
    assert r.headers["x-should-retry"] == "false" and r.json()["error"]["code"] == "job_cancelled"


# -- uploads ---------------------------------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with a tiny, incomplete IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data, message", [
    ("text.png", b"this is not a picture at all", "is not a PNG, JPEG or WebP image"),
    ("truncated.png", png_bytes(64, 64)[:-40], "truncated or corrupt"),
    ("bomb.png", png_header_only(20000, 20000), "decompression bomb"),
    ("big.png", png_header_only(5000, 5000), "25,000,000 pixels; the limit is"),
    ("anim.gif", png_bytes(fmt="GIF"), "is not a PNG, JPEG or WebP image"),
    ("empty.png", b"", "is empty"),
])
def test_bad_uploads(http, name, data, message):
    before = http.get("/v1/jobs", params={"limit": 1}).json()["data"]
    r = http.post("/v1/images/edits", data={"prompt": "x"}, files={"image": (name, data, "image/png")})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and name in error["message"] and error["param"] == "image"
    assert "x-qimg-job-id" not in r.headers
    assert http.get("/v1/jobs", params={"limit": 1}).json()["data"] == before  # no job was made


def test_too_many_images(http):
    files = [("image[]", (f"{i}.png", png_bytes(), "image/png")) for i in range(11)]
    r = http.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "too many images: 11 given, at most 10"


# -- files -----------------------------------------------------------------------------------------------------------
TRAVERSALS = ["/v1/files/../../../../etc/passwd", "/v1/files/..%2F..%2F..%2Fetc%2Fpasswd",
              "/v1/files/%2e%2e%2fjobs.sqlite3", "/v1/files/jobs.sqlite3", "/v1/files/..", "/v1/files/%00",
              "/v1/files/file_" + "0" * 32, "/v1/files/file_" + "0" * 32 + ".png",
              "/v1/files/file_" + "a" * 32 + "%2F..%2F..%2Fjobs.sqlite3", "/v1/files//etc/passwd",
              "/v1/files/FILE_" + "A" * 32, "/v1/files/file_" + "0" * 31 + "g", "/v1/files/%2Fetc%2Fpasswd",
              "/v1/files/file_" + "0" * 32 + "/..", "/v1/jobs/..%2F..%2Fetc%2Fpasswd"]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_file_ids_never_reach_the_filesystem(server, path):
    host, port = server.url.rsplit("/", 1)[-1].split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)  # http.client sends the path as written (no dot-segment clean-up)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status in (400, 404), (path, r.status)
    assert b"root:" not in body and b"SQLite format" not in body
    assert "error" in json.loads(body)


def test_file_served_with_extension_and_download(client, http):
    url = client.images.generate(prompt="x", size="64x64", response_format="url", extra_body={"steps": 1}).data[0].url
    assert http.get(url + ".png").status_code == 200
    r = http.get(url, params={"download": "true"})
    assert r.headers["content-disposition"].startswith("attachment")


# -- layers (test double model) ---------------------------------------------------------------------------------------
def test_layers_b64_and_export(http):
    from qimg.export import read_layers

    r = http.post("/v1/images/layers", data={"layers": "3", "format": "json"},
                  files={"image": ("in.png", png_bytes(48, 40), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["file"] is None and body["background"] == "transparent" and body["size"] == "48x40"
    layers = [decode(d["b64_json"]) for d in body["data"]]
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(img.mode == "RGBA" and img.size == (48, 40) for img in layers)
    job = http.get(f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
    assert job["kind"] == "layers" and job["model"] == "layers-double" and len(job["outputs"]) == 3

    for fmt in ("psd", "ora", "pptx", "zip"):
        r = http.post("/v1/images/layers", data={"layers": "2", "format": fmt, "response_format": "url"},
                      files={"image": ("in.png", png_bytes(48, 40), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert all("url" in d for d in body["data"])
        export = http.get(body["file"]["url"])
        assert export.status_code == 200 and export.headers["content-type"] == body["file"]["mime"]
        path = http_tmp(fmt, export.content)
        got, _ = read_layers(path)
        assert len(got) == 2

    # the export route: a reordered, filtered stack of stored layers
    ids = [f["id"] for f in sorted(job["outputs"], key=lambda f: f["index"])]
    r = http.post("/v1/images/layers/export", json={"layers": [ids[2], ids[0]], "format": "ora",
                                                     "names": ["top band", "bottom"]})
    assert r.status_code == 200, r.text
    got, names = read_layers(http_tmp("ora", http.get(r.json()["url"]).content))
    assert names == ["top band", "bottom"] and len(got) == 2
    r = http.post("/v1/images/layers/export", json={"layers": ["file_" + "0" * 32], "format": "psd"})
    assert r.status_code == 400


def test_layers_guidance_and_recursion_reach_the_pipeline(http, server):
    r = http.post("/v1/images/layers", data={"layers": "3", "guidance_scale": "2.5", "negative_prompt": "blurry",
                                             "cfg_normalize": "true", "recurse": "1", "caption_language": "zh"},
                  files={"image": ("in.png", png_bytes(48, 40), "image/png")})
    assert r.status_code == 200, r.text
    assert server.layers_double.calls[-1] == {"layers": 3, "resolution": None, "prompt": None, "steps": None,
                                              "cfg": 2.5, "negative_prompt": "blurry", "cfg_normalize": True,
                                              "recurse": 1, "caption_language": "zh"}
    job = http.get(f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
    assert job["params"]["cfg"] == 2.5 and job["params"]["recurse"] == 1
    r = http.post("/v1/images/layers", data={"layers": "2", "true_cfg_scale": "4"},
                  files={"image": ("in.png", png_bytes(48, 40), "image/png")})
    assert r.status_code == 200 and server.layers_double.calls[-1]["cfg"] == 4.0


def http_tmp(fmt, data):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / f"stack.{fmt}"
    path.write_bytes(data)
    return path


def test_layers_model_selection_and_limits(http):
    img = {"image": ("in.png", png_bytes(), "image/png")}
    r = http.post("/v1/images/layers", data={"model": "tiny"}, files=img)
    assert r.status_code == 400 and "does not do 'layers'" in r.json()["error"]["message"]
    r = http.post("/v1/images/layers", data={"layers": "99"}, files=img)
    assert r.status_code == 400 and r.json()["error"]["param"] == "layers"
    r = http.post("/v1/images/layers", data={"format": "tiff"}, files=img)
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    r = http.post("/v1/images/layers", data={"layers": "2"})
    assert r.status_code == 400 and "exactly one 'image'" in r.json()["error"]["message"]
    r = http.post("/v1/images/layers", data={"layers": "3", "recurse": "3"}, files=img)
    assert r.status_code == 400 and r.json()["error"]["param"] == "recurse" and "0 to 2" in r.json()["error"]["message"]
    r = http.post("/v1/images/layers", data={"caption_language": "fr"}, files=img)
    assert r.status_code == 400 and r.json()["error"]["param"] == "caption_language"
    r = http.post("/v1/images/layers", data={"guidance_scale": "-1"}, files=img)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale"


# -- queue bound, auth, limits, CORS (their own servers) ---------------------------------------------------------------
def test_queue_bound_429_with_retry_after(tmp_path):
    with ServerThread(make_settings(tmp_path, max_queue=1)) as srv, httpx.Client(base_url=srv.url,
                                                                                 timeout=TIMEOUT) as c:
        wait_models_loaded(srv.url)
        running = submit_async(c, 1000)
        wait_status(c, running, ("running",))
        queued = submit_async(c, 1000)
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
        assert "x-qimg-job-id" not in r.headers
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0).images.generate(prompt="x")
        assert c.delete(f"/v1/jobs/{queued}").status_code == 200
        assert c.delete(f"/v1/jobs/{running}").status_code == 202
        wait_status(c, running, ("cancelled",))
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1})
        assert r.status_code == 200
