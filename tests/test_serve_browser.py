"""The web page in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium) against a live
server with the tiny checkpoint and the `FakeLayered` TEST DOUBLE for layers (the Layered pipeline is written
elsewhere; the page and routes are real). Screenshots go to tests/artifacts/ (ignored by git).

Needs: `apt-get install -y chromium` and the `playwright` package; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent: install Debian's Chromium (apt-get install -y chromium) to run the browser "
                f"test", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from tests.serve_support import FakeLayered, ServerThread, make_settings, png_bytes, wait_models_loaded  # noqa

pytestmark = pytest.mark.slow  # quick subset: python -m pytest -q -m 'not slow'

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts"
KEY = "browser-key-42"


def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_page_generate_history_layers(tmp_path, browser):
    out = artifacts()
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(96, 72))
    import qimg
    from tests.lora_files import linear_shapes, random_lora, write_lora
    from tests.serve_support import reference_checkpoint

    loras = tmp_path / "loras"
    loras.mkdir()
    shapes = linear_shapes(qimg.load(reference_checkpoint(), dtype="float32", device="cpu").transformer)
    write_lora(loras / "ink.safetensors", random_lora(shapes), "peft")
    settings = make_settings(tmp_path / "data", preview_interval=0.2, api_keys=(KEY,), lora_dir=loras)
    double = FakeLayered(step_seconds=0.05)
    with ServerThread(settings, pipelines={"layers-double": double}) as srv:
        wait_models_loaded(srv.url)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        # the server needs a key: the page asks for it and keeps it in localStorage
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", KEY)
        page.click("#key-save")
        page.wait_for_function("document.querySelectorAll('#panel-generate .model-select option').length > 0")
        assert page.evaluate("localStorage.getItem('qimg.apiKey')") == KEY

        # generate: progress bar to the end, result shown
        page.fill("#gen-prompt", "a red fox in the snow")
        page.select_option("#gen-size", "64x64")
        page.fill("#gen-steps", "12")
        page.click(".dice[data-for=gen-seed]")
        seed = page.input_value("#gen-seed")
        assert seed.isdigit()
        # the sampler menu lists what the server's pipelines offer
        offered = page.eval_on_selector_all("#panel-generate .sampler-select option", "els => els.map(e => e.value)")
        assert offered[0] == "" and "dpmpp-2m" in offered
        page.select_option("#panel-generate .sampler-select", "dpmpp-2m")
        page.wait_for_selector("#panel-generate .lora-field:not([hidden])")  # the server has LoRAs
        page.select_option("#panel-generate .lora-select", "ink")
        page.fill("#panel-generate [name=lora_scale]", "0.7")
        page.click("#gen-run")
        page.wait_for_selector("#progress-box:not([hidden])")
        page.wait_for_function("document.querySelector('#progress').max == 12", timeout=60000)
        page.screenshot(path=str(out / "serve-generate-running.png"))
        page.wait_for_selector("#gen-result img", timeout=60000)
        assert page.eval_on_selector("#progress", "e => [e.value, e.max]") == [12, 12]
        assert page.text_content("#progress-step").startswith("done: 12/12")
        assert page.eval_on_selector("#gen-result img", "e => e.naturalWidth") == 64
        page.screenshot(path=str(out / "serve-generate-done.png"))
        import httpx2 as httpx

        newest = httpx.get(srv.url + "/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
        assert newest["kind"] == "generate" and newest["params"]["sampler"] == "dpmpp-2m"
        assert newest["params"]["loras"] == [{"name": "ink", "scale": 0.7}]

        # history survives a reload
        page.reload()
        page.wait_for_selector("#history li[data-kind=generate][data-status=succeeded] img[src^='blob:']")
        page.click("#history li[data-kind=generate]")
        assert page.input_value("#gen-prompt") == "a red fox in the snow"
        assert page.input_value("#gen-seed") == seed

        # errors show up as messages
        page.fill("#gen-steps", "5000")
        page.evaluate("document.querySelector('#gen-steps').removeAttribute('max')")
        page.click("#gen-run")
        page.wait_for_selector("#error:not([hidden])")
        assert "steps" in page.text_content("#error-text")
        page.click("#error-close")

        # edit: one dropped image, instruction, before/after compare slider
        page.click("#tab-edit")
        page.set_input_files("#edit-files", str(picture))
        assert page.locator("#edit-thumbs img").count() == 1
        page.fill("#edit-prompt", "make it blue")
        page.fill("#panel-edit input[name=steps]", "2")
        page.click("#edit-run")
        page.wait_for_selector("#edit-compare:not([hidden]) #compare-after[src^='blob:']", timeout=60000)
        page.fill("#compare-range", "80")
        assert "80%" in page.eval_on_selector("#compare-after", "e => e.style.clipPath")
        page.screenshot(path=str(out / "serve-edit.png"))

        # layers: decompose, toggle, reorder, download the PSD
        page.click("#tab-layers")
        page.set_input_files("#layers-file", str(picture))
        page.fill("#layers-count", "3")
        page.fill("#panel-layers [name=guidance_scale]", "3.5")
        page.fill("#panel-layers [name=negative_prompt]", "blurry")
        page.click("#layers-run")
        page.wait_for_selector("#layer-list li:nth-child(3)", timeout=60000)
        assert (double.calls[-1]["cfg"], double.calls[-1]["negative_prompt"]) == (3.5, "blurry")
        assert page.eval_on_selector("#progress", "e => e.value == e.max")
        names = page.eval_on_selector_all("#layer-list .name", "els => els.map(e => e.textContent)")
        assert names == ["Layer 3", "Layer 2", "Layer 1"]  # top first
        page.click("#layer-list li:nth-child(1) .layer-down")  # Layer 3 below Layer 2
        names = page.eval_on_selector_all("#layer-list .name", "els => els.map(e => e.textContent)")
        assert names == ["Layer 2", "Layer 3", "Layer 1"]
        page.uncheck("#layer-list li:nth-child(3) .layer-visible")  # hide Layer 1 (the bottom one)
        assert page.eval_on_selector_all("#layers-stack img:not(.base)", "els => els.map(e => e.hidden)") == \
            [True, False, False]
        page.screenshot(path=str(out / "serve-layers.png"))
        with page.expect_download() as download:
            page.click("#dl-psd")
        psd = tmp_path / "download.psd"
        download.value.save_as(psd)
        assert download.value.suggested_filename == "qimg-layers.psd"

        from qimg.export import read_layers

        layers, layer_names = read_layers(psd)
        assert layer_names == ["Layer 3", "Layer 2"] and len(layers) == 2
        assert layers[0].size == (96, 72)
        assert not errors, errors
        page.close()
