"""LoRAs through the server: `--lora-dir`, requests naming them with scales, `GET /v1/loras`, one loaded model
serving every LoRA set (measured: loads and file reads), refusals, the record a requeued job is rebuilt from."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

import numpy as np  # noqa: E402

from tests.serve_support import ServerThread, make_settings, png_bytes, reference_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    import qimg
    from tests.lora_files import linear_shapes, random_lora, write_lora

    folder = tmp_path_factory.mktemp("loras")
    pipe = qimg.load(reference_checkpoint(), dtype="float32", device="cpu")
    shapes = linear_shapes(pipe.transformer)
    write_lora(folder / "ink.safetensors", random_lora(shapes, seed=1), "peft")
    (folder / "styles").mkdir()
    write_lora(folder / "styles" / "neon.safetensors", random_lora(shapes, rank=2, seed=2), "kohya", alpha=1)
    (folder / "notes.txt").write_text("not a LoRA")
    return folder


def test_loras_per_request_on_one_loaded_model(lora_dir, tmp_path, monkeypatch):
    import time

    import qimg
    import qimg.adapters.manager as manager

    loads, reads = [], []
    load, read = qimg.load, manager.read_adapter
    monkeypatch.setattr(qimg, "load", lambda *a, **k: loads.append(a) or load(*a, **k))
    monkeypatch.setattr(manager, "read_adapter", lambda *a, **k: reads.append(a[0]) or read(*a, **k))
    settings = make_settings(tmp_path / "data", lora_dir=lora_dir)
    with ServerThread(settings) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        listed = c.get("/v1/loras").json()["data"]
        assert [item["id"] for item in listed] == ["ink", "styles/neon"]
        assert listed[0]["format"].startswith("diffusers/PEFT") and listed[0]["family"] == "2.x"
        assert listed[1]["ranks"] == [2] and listed[1]["format"].startswith("kohya")
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)

        def picture(loras):
            extra = {"seed": 4, "steps": 2, **({"loras": loras} if loras is not None else {})}
            start = time.perf_counter()
            raw = client.images.with_raw_response.generate(prompt="a red circle", size="64x64", extra_body=extra)
            from PIL import Image
            import base64, io  # noqa: E401

            img = Image.open(io.BytesIO(base64.b64decode(raw.parse().data[0].b64_json)))
            return np.asarray(img, dtype=int), time.perf_counter() - start, raw.headers["x-qimg-job-id"]

        plain, _, _ = picture(None)
        ink, first_ink_s, job = picture([{"name": "ink", "scale": 0.8}])
        neon, _, _ = picture([{"name": "styles/neon", "scale": 1.0}])
        ink_again, again_s, _ = picture([{"name": "ink", "scale": 0.8}])
        both, _, _ = picture([{"name": "ink", "scale": 0.5}, {"name": "styles/neon", "scale": 0.5}])
        plain_again, _, _ = picture([])
        assert len(loads) == 1  # one model load for every LoRA set
        assert sorted(p.name for p in reads) == ["ink.safetensors", "neon.safetensors"]  # each file read once
        assert np.array_equal(ink, ink_again) and np.array_equal(plain, plain_again)
        assert np.abs(ink - plain).max() > 2 and np.abs(neon - ink).max() > 2 and np.abs(both - ink).max() > 2
        params = c.get(f"/v1/jobs/{job}").json()["params"]
        assert params["loras"] == [{"name": "ink", "scale": 0.8}]
        # the library gives the same picture for the same LoRA
        lib = qimg.load(reference_checkpoint(), dtype="float32", device="cpu",
                        loras=[(lora_dir / "ink.safetensors", 0.8)], lora_mode="unfused")
        expected = lib.generate("a red circle", width=64, height=64, seed=4, steps=2)[0]
        assert np.array_equal(ink, np.asarray(expected, dtype=int))
        print(f"first request with ink {first_ink_s:.2f} s, switching back to it {again_s:.2f} s")

        for loras, message in (([{"name": "nope"}], "unknown LoRA 'nope'; available: ink, styles/neon"),
                               ([{"name": "../loras/ink"}], "unknown LoRA '../loras/ink'"),
                               ([{"name": "notes"}], "unknown LoRA 'notes'"),
                               ([{"name": "ink"}, {"name": "ink"}], "named twice")):
            with pytest.raises(openai.BadRequestError, match=message):
                client.images.generate(prompt="x", size="64x64", extra_body={"loras": loras})
        edit = c.post("/v1/images/edits", data={"prompt": "x", "steps": "1", "loras": json.dumps([{"name": "ink"}])},
                      files={"image": ("in.png", png_bytes(32, 32), "image/png")})
        assert edit.status_code == 200, edit.text
        bad = c.post("/v1/images/edits", data={"prompt": "x", "loras": "[oops"},
                     files={"image": ("in.png", png_bytes(32, 32), "image/png")})
        assert bad.status_code == 400 and "loras must be a JSON list" in bad.text


def test_a_server_without_a_lora_dir_says_so(tmp_path):
    with ServerThread(make_settings(tmp_path / "data")) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/v1/loras").json()["data"] == []
        r = c.post("/v1/images/generations", json={"prompt": "x", "loras": [{"name": "ink"}]})
        assert r.status_code == 400 and "start it with --lora-dir" in r.json()["error"]["message"]
