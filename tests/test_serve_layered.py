"""/v1/images/layers on the real Qwen-Image-Layered pipeline (a tiny random checkpoint saved by diffusers),
served by a live uvicorn server: the layers, their job, the PSD, and the model's tasks in /v1/models."""

from __future__ import annotations

import base64
import io
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx2")

from PIL import Image  # noqa: E402

from tests.serve_support import ServerThread, make_settings, png_bytes, wait_models_loaded  # noqa: E402


def test_layers_with_the_layered_pipeline(ref_layered, tmp_path):
    _, folder = ref_layered
    settings = make_settings(tmp_path / "data", models={"layered": str(folder)})
    with ServerThread(settings) as srv, httpx.Client(base_url=srv.url, timeout=300) as c:
        wait_models_loaded(srv.url)
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["layered"]["tasks"] == ["layers"]
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 400 and "no model on this server does 'generate'" in r.json()["error"]["message"]
        r = c.post("/v1/images/layers", data={"layers": "2", "resolution": "64", "steps": "2", "seed": "3",
                                               "prompt": "a red square", "format": "psd"},
                   files={"image": ("in.png", png_bytes(64, 64), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        layers = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
        assert len(layers) == 2 and all(img.mode == "RGBA" for img in layers)
        job = c.get(f"/v1/jobs/{r.headers['x-qimg-job-id']}").json()
        assert job["status"] == "succeeded" and job["model"] == "layered" and job["export"]["mime"].endswith("photoshop")
        psd = c.get(body["file"]["url"])
        assert psd.status_code == 200 and psd.content[:4] == b"8BPS"
        # guidance, a negative prompt and a recursive split reach the real pipeline: its parameters ride in each
        # layer PNG, and recursing into layer 0 of 2 returns 1 + 2 layers
        r = c.post("/v1/images/layers", data={"layers": "2", "resolution": "64", "steps": "2", "seed": "3",
                                               "prompt": "a red square", "guidance_scale": "2.5",
                                               "negative_prompt": "blurry", "recurse": "0"},
                   files={"image": ("in.png", png_bytes(64, 64), "image/png")})
        assert r.status_code == 200, r.text
        layers = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
        assert len(layers) == 3
        meta = json.loads(layers[0].text["qimg"])
        assert (meta["cfg"], meta["negative_prompt"], meta["recurse"], meta["seed"]) == (2.5, "blurry", 0, 3)
        assert meta["job_id"] == r.headers["x-qimg-job-id"] and (meta["layer"], meta["of"]) == (0, 3)
        r = c.post("/v1/images/layers", data={"layers": "2", "resolution": "50", "prompt": "x"},
                   files={"image": ("in.png", png_bytes(64, 64), "image/png")})
        assert r.status_code == 400 and "resolution" in r.json()["error"]["message"]
