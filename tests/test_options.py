"""The options objects: validated where they are built, recorded and rebuilt; and the package layout rule that
inference never imports the CLI or the server."""

import ast
from pathlib import Path

import pytest
from PIL import Image

from qimg.errors import InputError
from qimg.options import GenerateOptions, LayersOptions, LoadOptions

QIMG = Path(__file__).resolve().parent.parent / "qimg"


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=3), "prompt must be a string, got int"),
    (dict(prompt=" \n"), "prompt is empty"),
    (dict(steps=0), "steps must be an integer from 1 to 1000, got 0"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=True), "seed must be an integer"),
    (dict(cfg=-1), "cfg must be a number >= 0, got -1"),
    (dict(cfg=float("nan")), "cfg must be a number"),
    (dict(n=17), "n must be an integer from 1 to 16, got 17"),
    (dict(width=64.5), "width must be an integer, got 64.5"),
    (dict(resolution=8), "resolution must be an integer from 32 to 4096, got 8"),
    (dict(background="green"), "background must be 'transparent', 'opaque' or 'auto'"),
    (dict(sigmas=[1.0, 0.0]), r"sigmas must lie in \(0, 1\]"),
    (dict(sigmas=[]), "sigmas must be a non-empty list"),
    (dict(sigmas="1,0.5"), "sigmas must be a list of numbers"),
    (dict(shift=0), "shift must be a number > 0, got 0"),
    (dict(scheduler={"shift_terminal": "x", "frobnicate": 2}), "frobnicate"),
    (dict(scheduler=[1]), "scheduler must be a mapping"),
    (dict(sampler="ddim"), "sampler must be one of"),
    (dict(preset="lightning-2"), "preset must be one of"),
    (dict(images=["x"]), "image 1 is a str, not a picture"),
    (dict(vae_image_area=10), "vae_image_area must be an integer number of pixels"),
    (dict(cancel=5), "cancel must be callable"),
    (dict(cfg_normalize="yes"), "cfg_normalize must be true or false"),
])
def test_generate_options_name_the_bad_value(kwargs, message):
    with pytest.raises(InputError, match=message):
        GenerateOptions(**{"prompt": "a", **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=1), "layers must be an integer from 2 to 10, got 1"),
    (dict(recurse=4), r"recurse must be the index of a returned layer, 0 to 3, got 4"),
    (dict(caption_language="fr"), "caption_language must be 'en' or 'zh'"),
    (dict(image=None), "image 1 is a NoneType, not a picture"),
    (dict(prompt=1), "prompt must be a string"),
])
def test_layers_options_name_the_bad_value(kwargs, message):
    with pytest.raises(InputError, match=message):
        LayersOptions(**{"image": Image.new("RGB", (8, 8)), **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(device="gpu7"), "device must be cpu, cuda, cuda:N or mps"),
    (dict(task="paint"), "task must be one of"),
    (dict(attention="nope"), "attention backend must be one of"),
    (dict(preset="nope"), "preset must be one of"),
    (dict(offload="yes"), "offload must be true/false, 'model' or 'blocks'"),
])
def test_load_options_name_the_bad_value(kwargs, message):
    with pytest.raises(InputError, match=message):
        LoadOptions(**kwargs)


def test_record_round_trip():
    images = [Image.new("RGB", (8, 8)), Image.new("RGBA", (4, 6))]
    options = GenerateOptions(prompt="a", images=images, width=64, height=32, steps=3, seed=9, cfg=2,
                              negative_prompt="b", sigmas=[1.0, 0.5], scheduler={"shift_terminal": None},
                              shift=2.0, sampler="dpmpp-2m", n=2, background="opaque", cfg_normalize=True,
                              progress=print, cancel=lambda: False)
    record = options.to_record()
    assert record["images"] == 2 and "progress" not in record and "cancel" not in record
    import json

    record = json.loads(json.dumps(record))  # what a job row keeps
    again = GenerateOptions.from_record(record, images)
    assert again == options  # callbacks do not take part in equality
    assert again.progress is None and again.images == tuple(images)
    layers = LayersOptions(image=images[1], layers=3, recurse=2, prompt=None, caption_language="zh", seed=4)
    assert LayersOptions.from_record(json.loads(json.dumps(layers.to_record())), [images[1]]) == layers


def test_frozen():
    options = GenerateOptions(prompt="a")
    with pytest.raises(AttributeError):
        options.steps = 3


INFERENCE = ("models", "sampling", "loading", "pipelines")


def imported_modules(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_inference_never_imports_the_cli_or_the_server():
    offenders = []
    for package in INFERENCE:
        for path in (QIMG / package).rglob("*.py"):
            for module in imported_modules(path):
                if module.startswith(("qimg.cli", "qimg.serve")):
                    offenders.append(f"{path.relative_to(QIMG)} imports {module}")
    assert not offenders, offenders
    assert not (QIMG / "pipelines" / "layers_cli.py").exists()


def test_no_module_over_600_lines():
    long = [f"{p.relative_to(QIMG)}: {n}" for p in QIMG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600]
    assert not long, long
