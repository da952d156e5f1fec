"""Access to the HTTP service: API keys on every route, the request-body limit and the CORS allow-list, against a
live uvicorn server on 127.0.0.1 (a thread of this process) with the tiny random Qwen-Image 2.x checkpoint and the
`FakeLayered` TEST DOUBLE for /v1/images/layers (see serve_support); and the `qimg serve` command's options."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

from tests.serve_support import FakeLayered, ServerThread, make_settings, png_bytes, wait_models_loaded  # noqa: E402

KEY = "test-key-0123456789"
TIMEOUT = 120


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    from qimg.serve.settings import Limits

    settings = make_settings(tmp_path_factory.mktemp("strict"), api_keys=(KEY, "second-key"),
                             cors_origins=("http://allowed.example",),
                             limits=Limits(max_request_bytes=256 * 1024))
    with ServerThread(settings, pipelines={"layers-double": FakeLayered()}) as srv:
        wait_models_loaded(srv.url)
        yield srv


API_ROUTES = [("POST", "/v1/images/generations"), ("POST", "/v1/images/edits"), ("POST", "/v1/images/layers"),
              ("POST", "/v1/images/layers/export"), ("GET", "/v1/models"), ("GET", "/v1/models/tiny"),
              ("GET", "/v1/jobs"), ("GET", "/v1/jobs/job_" + "0" * 32), ("GET", "/v1/jobs/job_" + "0" * 32 + "/events"),
              ("DELETE", "/v1/jobs/job_" + "0" * 32), ("GET", "/v1/files/file_" + "0" * 32), ("GET", "/docs"),
              ("GET", "/openapi.json"), ("GET", "/v1/unknown")]


def test_auth_required_on_every_api_route(strict):
    with httpx.Client(base_url=strict.url, timeout=TIMEOUT) as c:
        for method, path in API_ROUTES:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = c.request(method, path, headers=headers, json={"prompt": "x"} if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["type"] == "authentication_error"
        assert c.get("/health").status_code == 200 and c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200
        assert c.get("/v1/jobs", headers={"Authorization": "Bearer second-key"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=strict.url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=strict.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    url = good.images.generate(prompt="x", size="64x64", response_format="url", extra_body={"steps": 1}).data[0].url
    with httpx.Client() as c:
        assert c.get(url).status_code == 401
        assert c.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_request_body_limit(strict):
    big = png_bytes() + b"\0" * (300 * 1024)
    with httpx.Client(base_url=strict.url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {KEY}"}) as c:
        r = c.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big, "image/png")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            for _ in range(40):
                yield b"x" * 10000
            yield b'"}'

        r = c.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_cors_allow_list(strict):
    with httpx.Client(base_url=strict.url, timeout=TIMEOUT) as c:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        r = c.options("/v1/images/generations", headers={"Origin": "http://allowed.example", **pre})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://allowed.example"
        r = c.options("/v1/images/generations", headers={"Origin": "http://evil.example", **pre})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.get("/v1/models", headers={"Origin": "http://allowed.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://allowed.example"
        r = c.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# -- CLI ---------------------------------------------------------------------------------------------------------
def test_cli_registers_serve_and_parses_options(tmp_path):
    from qimg.cli import build_parser
    from qimg.errors import InputError
    from qimg.cli.serve import is_loopback, parse_models, settings_from_args

    folder = tmp_path / "my-model"
    folder.mkdir()
    from qimg.loading.files import embedded_model_path

    layered = (embedded_model_path("qimg-tiny-layered") / "model_index.json").is_file()
    assert parse_models([]) == {"qimg-tiny": None, **({"qimg-tiny-layered": "qimg-tiny-layered"} if layered else {})}
    assert parse_models([str(folder), "other=/x/y", "Qwen/Qwen-Image"]) == {
        "my-model": str(folder), "other": "/x/y", "Qwen/Qwen-Image": "Qwen/Qwen-Image"}
    with pytest.raises(InputError, match="the name 'a' is used twice"):
        parse_models(["a=/x", "a=/y"])
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.1")
    parser = build_parser()
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path), "--max-queue", "3", "--api-key", "k1",
                              "--cors-origin", "http://a.example", "--model", f"m={folder}"])
    assert args.handler.__module__ == "qimg.cli.serve"
    settings = settings_from_args(args)
    assert settings.max_queue == 3 and settings.api_keys == ("k1",) and settings.models == {"m": str(folder)}
    assert settings.host == "127.0.0.1" and settings.port == 8000 and settings.cors_origins == ("http://a.example",)
    assert settings.requeue and not settings_from_args(
        parser.parse_args(["serve", "--data-dir", str(tmp_path), "--no-requeue"])).requeue
    assert not settings.load.offload and settings_from_args(
        parser.parse_args(["serve", "--data-dir", str(tmp_path), "--offload"])).load.offload
    with pytest.raises(InputError, match="--api-key"):
        settings_from_args(parser.parse_args(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]))
