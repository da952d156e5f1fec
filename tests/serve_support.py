"""Helpers for the server tests (no tests here): the tiny checkpoint, live servers, a layers test double.

`FakeLayered` is a TEST DOUBLE for the Layered pipeline: it implements the agreed `layers(LayersOptions)` call
(RGBA layers, bottom to top) with cheap arithmetic (instant), reports progress and honours the options' `cancel`. The server's route code is the real
one; tests/test_serve_layered.py runs the same route on the real QwenImageLayeredPipeline.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SIZE = 64  # the tiny checkpoint's default resolution in these tests


@functools.lru_cache(maxsize=None)
def reference_checkpoint() -> Path:
    """A tiny random Qwen-Image 2.x checkpoint (built once per process), defaulting to 64x64 and 2 steps."""
    pytest.importorskip("diffusers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.reference import build_reference_21

    folder = Path(tempfile.mkdtemp(prefix="qimg-serve-ref-"))
    import atexit

    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    build_reference_21(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_qimg"] = {"default_resolution": SIZE, "default_steps": 2}
    index_path.write_text(json.dumps(index, indent=2))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(width=48, height=40, colour=(200, 40, 40), mode="RGB", fmt="PNG") -> bytes:
    from PIL import Image

    img = Image.new(mode, (width, height), colour if mode == "RGB" else (*colour, 255))
    for x in range(width // 2):  # something that is not flat
        img.putpixel((x, x % height), (10, 200, 10) if mode == "RGB" else (10, 200, 10, 128))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


class FakeLayered:
    """Test double for the Layered pipeline (see the module docstring)."""

    pipeline_class = "FakeLayeredPipeline"

    def __init__(self, step_seconds: float = 0.0):
        self.step_seconds = step_seconds
        self.calls = []

    def describe(self) -> dict:
        return {"pipeline": self.pipeline_class, "tasks": ["layers"], "test_double": True}

    def layers(self, options):
        from PIL import Image

        from qimg.errors import Cancelled
        from qimg.pipelines.base import ProgressEvent

        self.calls.append({"layers": options.layers, "resolution": options.resolution, "prompt": options.prompt,
                           "steps": options.steps, "cfg": options.cfg, "negative_prompt": options.negative_prompt,
                           "cfg_normalize": bool(options.cfg_normalize), "recurse": options.recurse,
                           "caption_language": options.caption_language})
        steps = options.steps or 3
        start = time.perf_counter()
        base = options.image.convert("RGBA")
        if options.resolution:
            base = base.resize((options.resolution, options.resolution))
        for i in range(steps):
            if options.cancel is not None and options.cancel():
                raise Cancelled(f"cancelled after {i} of {steps} steps")
            time.sleep(self.step_seconds)
            if options.progress:
                options.progress(ProgressEvent("denoise", i + 1, steps, time.perf_counter() - start, None,
                                               preview=lambda: base.copy()))
        w, h = base.size
        out = []
        for k in range(options.layers):  # layer k keeps horizontal band k of the picture; the bottom one is opaque
            layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
            top, bottom = h * k // options.layers, h * (k + 1) // options.layers
            layer.paste(base.crop((0, top, w, bottom)), (0, top))
            if k == 0:
                layer = Image.alpha_composite(Image.new("RGBA", (w, h), (255, 255, 255, 255)), layer)
            out.append(layer)
        return out


class BlockingImages:
    """TEST DOUBLE for an image pipeline that runs until released (or cancelled, or timed out): it holds the worker
    so that later jobs stay queued. Steps are reported every 20 ms; `cancel` is polled between them."""

    pipeline_class = "BlockingImagesPipeline"

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.steps = 0

    def describe(self) -> dict:
        return {"pipeline": self.pipeline_class, "tasks": ["generate", "edit"], "test_double": True}

    def generate(self, options):
        from PIL import Image

        from qimg.errors import Cancelled
        from qimg.pipelines.base import ProgressEvent

        self.started.set()
        step, start = 0, time.perf_counter()
        while not self.release.wait(0.02):
            if options.cancel is not None and options.cancel():
                raise Cancelled(f"cancelled after {step} steps")
            step += 1
            self.steps = step
            if options.progress:
                options.progress(ProgressEvent("denoise", step, 10**6, time.perf_counter() - start, None))
        return [Image.new("RGB", (8, 8), (1, 2, 3))]


def wait_health(url: str, timeout: float = 60.0, proc=None, key: str | None = None) -> dict:
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except Exception as err:  # not up yet
            last = err
        time.sleep(0.1)
    raise TimeoutError(f"server at {url} did not answer /health in {timeout} s ({last})")


def wait_models_loaded(url: str, timeout: float = 60.0) -> None:
    import httpx2 as httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health", timeout=5).json()
        if not health["queue"]["loading_models"] and all(s != "not loaded" for s in health["models"].values()):
            return
        time.sleep(0.1)
    raise TimeoutError("models did not load")


class ServerThread:
    """A real uvicorn server on 127.0.0.1 in a thread of this process (so test doubles can be served)."""

    def __init__(self, settings, pipelines=None):
        import uvicorn

        from qimg.serve.app import create_app

        self.app = create_app(settings, pipelines=pipelines)
        self.settings = settings
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning",
                                timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "test server did not stop"


def make_settings(data_dir, *, models=None, **kw):
    from qimg.serve.settings import Settings

    if models is None:
        models = {"tiny": str(reference_checkpoint())}
    return Settings(models=models, port=free_port(), data_dir=Path(data_dir), **kw)


class ServerProcess:
    """`qimg serve` in a subprocess (for kill/restart tests)."""

    def __init__(self, data_dir, *extra, model=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "qimg.cli", "serve", "--port", str(self.port), "--data-dir",
                     str(data_dir), "--model", f"tiny={model or reference_checkpoint()}", "--log-level", "warning",
                     *extra]
        self.proc = None
        self.log = Path(data_dir).parent / f"server-{self.port}.log"

    def start(self, timeout=90.0):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_health(self.url, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self):
        """SIGKILL: no clean-up of any kind."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(Exception):
            self._log.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
