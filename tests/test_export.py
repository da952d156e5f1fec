"""Layer-stack exporters: PSD, OpenRaster, PPTX and ZIP round trips, structure, errors and atomicity."""

from __future__ import annotations

import io
import json
import sys
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest
from PIL import Image

from qimg.errors import InputError, QimgError
from qimg.export import composite, export_layers, read_layers
from qimg.export import ora as ora_module
from qimg.export import pptx as pptx_module
from qimg.export import zip as zip_module
from qimg.export.psd import read_psd_composite

FORMATS = ["psd", "ora", "pptx", "zip"]
WIDTH, HEIGHT = 96, 64
NAMES = ["Background", "Ciel – été/ü", "Person", "Glow"]


def make_layers(seed: int = 0, count: int = 4, size=(WIDTH, HEIGHT), opaque_bottom: bool = True) -> list[Image.Image]:
    """Noise layers: an opaque bottom, then layers with transparent areas, semi-transparent and opaque pixels."""
    rng = np.random.default_rng(seed)
    width, height = size
    layers = []
    for index in range(count):
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        if index == 0 and opaque_bottom:
            pixels[..., 3] = 255
        else:
            pixels[: height // 3 * ((index % 2) + 1) // 2, :, 3] = 0  # a fully transparent band
            pixels[:, : width // 4 * index, 3] = 0
            pixels[height - 8 :, width - 8 :, 3] = 255  # an opaque corner
        layers.append(Image.fromarray(pixels, "RGBA"))
    return layers


def as_int(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"), dtype=np.int32)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(as_int(a) - as_int(b)).max())


def matte_over_white(image: Image.Image) -> np.ndarray:
    """Colour composited over white where alpha > 0 (how PSD stores its merged image), alpha kept."""
    pixels = as_int(image).astype(np.float64)
    alpha = pixels[..., 3:] / 255.0
    color = np.where(alpha > 0, pixels[..., :3] * alpha + 255.0 * (1.0 - alpha), pixels[..., :3])
    return np.concatenate([np.rint(color), pixels[..., 3:]], axis=-1)


def only_entries(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- composite -------------------------------------------------------------------------------------


def test_composite_over_operator_known_values():
    blue = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    half_red = Image.new("RGBA", (2, 1), (255, 0, 0, 128))
    assert composite([blue, half_red]).getpixel((0, 0)) == (128, 0, 127, 255)
    clear = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    assert composite([clear, clear]).getpixel((0, 0))[3] == 0
    assert composite([clear, half_red]).getpixel((0, 0)) == (255, 0, 0, 128)


def test_composite_matches_pillow_alpha_composite():
    layers = make_layers(seed=3, opaque_bottom=False)
    expected = layers[0]
    for layer in layers[1:]:
        expected = Image.alpha_composite(expected, layer)
    ours = as_int(composite(layers))
    theirs = as_int(expected)
    visible = ours[..., 3] > 0
    assert np.abs(ours[..., 3] - theirs[..., 3]).max() <= 1
    assert np.abs(ours[visible] - theirs[visible]).max() <= 2  # Pillow uses integer approximations


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("count", [3, 4])
def test_round_trip_default_names(tmp_path, fmt, count):
    layers = make_layers(seed=count, count=count)
    path = tmp_path / f"stack.{fmt}"
    export_layers(layers, path)
    read, names = read_layers(path)
    assert names == [f"Layer {index + 1}" for index in range(count)]
    assert [layer.size for layer in read] == [(WIDTH, HEIGHT)] * count
    assert all(layer.mode == "RGBA" for layer in read)
    assert max_diff(composite(read), composite(layers)) <= 1
    for original, back in zip(layers, read):  # every format stores the layers losslessly, in order
        assert max_diff(original, back) == 0
    assert only_entries(tmp_path) == [path.name]


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_given_names_and_transparent_bottom(tmp_path, fmt):
    layers = make_layers(seed=7, count=4, opaque_bottom=False)
    path = tmp_path / f"stack.{fmt.upper()}"  # suffix matching ignores case
    export_layers(layers, path, names=NAMES)
    read, names = read_layers(path)
    assert names == NAMES
    assert max_diff(composite(read), composite(layers)) <= 1
    assert all(max_diff(original, back) == 0 for original, back in zip(layers, read))


def test_rgb_layers_are_converted(tmp_path):
    layers = [make_layers(seed=1)[0].convert("RGB")] + make_layers(seed=2)[1:3]
    path = tmp_path / "stack.zip"
    export_layers(layers, path)
    read, _ = read_layers(path)
    assert read[0].getchannel("A").getextrema() == (255, 255)
    assert max_diff(composite(read), composite([layers[0].convert("RGBA")] + layers[1:])) == 0


# --- OpenRaster structure --------------------------------------------------------------------------


def test_ora_structure(tmp_path):
    layers = make_layers(seed=11, count=3)
    path = tmp_path / "stack.ora"
    export_layers(layers, path, names=NAMES[:3])
    raw = path.read_bytes()
    assert raw[30:38] == b"mimetype" and raw[38:54] == b"image/openraster"  # the spec's magic-number layout
    with zipfile.ZipFile(path) as archive:
        first = archive.infolist()[0]
        assert first.filename == "mimetype"
        assert first.compress_type == zipfile.ZIP_STORED and first.extra == b""
        assert archive.read("mimetype") == b"image/openraster"
        root = ET.fromstring(archive.read("stack.xml"))
        assert root.tag == "image" and root.get("version") == "0.0.5"
        assert (root.get("w"), root.get("h")) == (str(WIDTH), str(HEIGHT))
        stack = root.find("stack")
        assert stack is not None
        entries = stack.findall("layer")
        assert [entry.get("name") for entry in entries] == NAMES[:3][::-1]  # top-most first
        for entry, layer in zip(entries, layers[::-1]):
            assert entry.get("src").startswith("data/") and entry.get("src").endswith(".png")
            assert (entry.get("x"), entry.get("y"), entry.get("opacity")) == ("0", "0", "1.0")
            assert entry.get("visibility") == "visible"
            assert entry.get("composite-op") == "svg:src-over"
            assert max_diff(Image.open(archive.open(entry.get("src"))), layer) == 0
        merged = Image.open(archive.open("mergedimage.png"))
        assert merged.mode == "RGBA" and max_diff(merged, composite(layers)) <= 1
        thumbnail = Image.open(archive.open("Thumbnails/thumbnail.png"))
        assert thumbnail.size == (WIDTH, HEIGHT)


def test_ora_thumbnail_is_at_most_256(tmp_path):
    layers = make_layers(seed=5, count=2, size=(600, 300))
    path = tmp_path / "big.ora"
    export_layers(layers, path)
    with zipfile.ZipFile(path) as archive:
        assert Image.open(archive.open("Thumbnails/thumbnail.png")).size == (256, 128)


# --- PSD composite ---------------------------------------------------------------------------------


def test_psd_stored_composite_opaque(tmp_path):
    """With an opaque bottom layer the merged image psd-tools reads back equals ours within 1/255."""
    layers = make_layers(seed=21, count=4)
    path = tmp_path / "stack.psd"
    export_layers(layers, path, names=NAMES)
    stored = read_psd_composite(path)
    assert stored is not None and stored.mode == "RGBA"
    assert max_diff(stored, composite(layers)) <= 1


def test_psd_stored_composite_semi_transparent(tmp_path):
    """PSD stores the merged image matted over white, 8-bit: compare it raw (Pillow's decoder) to ours matted."""
    layers = make_layers(seed=22, count=4, opaque_bottom=False)
    path = tmp_path / "stack.psd"
    export_layers(layers, path)
    expected = matte_over_white(composite(layers))
    with Image.open(path) as image:  # Pillow reads the merged image as stored, without un-matting
        assert image.mode == "RGBA" and len(image.layers) == 4
        assert [entry[0] for entry in image.layers] == ["Layer 1", "Layer 2", "Layer 3", "Layer 4"]
        stored = as_int(image)
    visible = expected[..., 3] > 0
    assert np.abs(stored[..., 3] - expected[..., 3]).max() <= 1
    assert np.abs(stored[visible] - expected[visible]).max() <= 1
    assert (expected[..., 3] < 255).any() and (expected[..., 3] == 0).any()


# --- PPTX and ZIP structure ------------------------------------------------------------------------


def test_pptx_structure(tmp_path):
    from pptx import Presentation

    layers = make_layers(seed=31, count=3)
    path = tmp_path / "stack.pptx"
    export_layers(layers, path, names=NAMES[:3])
    presentation = Presentation(str(path))
    assert len(presentation.slides) == 1
    width, height = presentation.slide_width, presentation.slide_height
    assert abs(width / height - WIDTH / HEIGHT) < 1e-6
    pictures = list(presentation.slides[0].shapes)
    assert [picture.name for picture in pictures] == NAMES[:3]
    for picture, layer in zip(pictures, layers):
        assert (picture.left, picture.top, picture.width, picture.height) == (0, 0, width, height)
        assert picture.image.content_type == "image/png"
        assert max_diff(Image.open(io.BytesIO(picture.image.blob)), layer) == 0


def test_pptx_slide_size_limits():
    assert pptx_module.slide_size((96, 64)) == (12192000, 8128000)
    assert pptx_module.slide_size((64, 96)) == (8128000, 12192000)
    width, height = pptx_module.slide_size((2000, 100))
    assert height == 914400 and width == 18288000
    with pytest.raises(InputError, match="elongated"):
        pptx_module.slide_size((10000, 100))


def test_zip_structure(tmp_path):
    layers = make_layers(seed=41, count=3)
    path = tmp_path / "stack.zip"
    export_layers(layers, path, names=["bg", "a/b c", "bg"])
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest == {"layers": [
            {"file": "01_bg.png", "name": "bg"},
            {"file": "02_a_b_c.png", "name": "a/b c"},
            {"file": "03_bg.png", "name": "bg"},
        ]}
        assert max_diff(Image.open(archive.open("composite.png")), composite(layers)) <= 1
    export_layers(layers, path)
    with zipfile.ZipFile(path) as archive:
        files = [entry["file"] for entry in json.loads(archive.read("manifest.json"))["layers"]]
        assert files == ["layer_01.png", "layer_02.png", "layer_03.png"]


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_suffix_writes_nothing(tmp_path):
    with pytest.raises(InputError) as caught:
        export_layers(make_layers(count=3), tmp_path / "stack.tiff")
    message = str(caught.value)
    assert "'.tiff'" in message and all(suffix in message for suffix in (".psd", ".ora", ".pptx", ".zip"))
    with pytest.raises(InputError, match="none"):
        export_layers(make_layers(count=3), tmp_path / "stack")
    assert only_entries(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_mismatched_sizes(tmp_path, fmt):
    layers = make_layers(count=2) + make_layers(count=1, size=(64, 96))
    with pytest.raises(InputError, match=r"layer 0 is 96x64, layer 2 is 64x96"):
        export_layers(layers, tmp_path / f"stack.{fmt}")
    assert only_entries(tmp_path) == []


@pytest.mark.parametrize(
    ("layers", "names", "match"),
    [
        ([], None, "empty"),
        ([Image.new("L", (4, 4))], None, r"layer 0 has mode 'L'"),
        (["not an image"], None, "layer 0 is a str"),
        ([Image.new("RGBA", (4, 4))] * 2, ["one"], "2 layers"),
        ([Image.new("RGBA", (4, 4))], [""], "non-empty"),
    ],
)
def test_invalid_input(tmp_path, layers, names, match):
    with pytest.raises(InputError, match=match):
        export_layers(layers, tmp_path / "stack.psd", names=names)
    assert only_entries(tmp_path) == []


def test_missing_optional_dependency(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pptx", None)  # makes `import pptx` raise ImportError
    with pytest.raises(QimgError, match=r"qimg\[export\]"):
        export_layers(make_layers(count=3), tmp_path / "stack.pptx")
    assert only_entries(tmp_path) == []


def _fail_on_second_call(monkeypatch, module):
    real, calls = module.png_bytes, []

    def flaky(image):
        calls.append(image)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(image)

    monkeypatch.setattr(module, "png_bytes", flaky)


def _fail_psd_save(monkeypatch):
    from psd_tools import PSDImage

    def partial_save(self, fp, *args, **kwargs):
        fp.write(b"8BPS partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(PSDImage, "save", partial_save)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, fmt, existing):
    path = tmp_path / f"stack.{fmt}"
    if existing:
        path.write_bytes(b"previous version")
    modules = {"ora": ora_module, "pptx": pptx_module, "zip": zip_module}
    if fmt == "psd":
        _fail_psd_save(monkeypatch)
    else:
        _fail_on_second_call(monkeypatch, modules[fmt])
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_layers(make_layers(count=3), path)
    if existing:
        assert only_entries(tmp_path) == [path.name] and path.read_bytes() == b"previous version"
    else:
        assert only_entries(tmp_path) == []


def test_read_unknown_suffix(tmp_path):
    with pytest.raises(InputError, match="'.png'"):
        read_layers(tmp_path / "stack.png")
