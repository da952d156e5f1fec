"""Layer stacks (RGBA images, bottom to top): validation, compositing, and the format dispatcher.

Formats: `.psd` (psd-tools), `.ora` (OpenRaster), `.pptx` (python-pptx), `.zip` (PNGs + manifest.json).
The writers live in `qimg.export.psd`, `.ora`, `.pptx` and `.zip`; each writes through `atomic_write`,
so an error never leaves a partial file behind.
"""

from __future__ import annotations

import importlib
import io
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from qimg.errors import InputError, QimgError

FORMATS = {".psd": "psd", ".ora": "ora", ".pptx": "pptx", ".zip": "zip"}


def export_layers(layers: Sequence[Image.Image], path: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Write `layers` (bottom to top) to `path`; the suffix picks the format. Everything is checked first."""
    fmt = _format(path)
    layers = check_layers(layers)
    check_names(names, len(layers))  # fail before importing or writing anything
    writer = getattr(importlib.import_module(f"qimg.export.{fmt}"), f"write_{fmt}")
    writer(layers, path, names)


def read_layers(path: str | os.PathLike) -> tuple[list[Image.Image], list[str]]:
    """Read a stack written by `export_layers` (or a compatible file): RGBA layers bottom to top, and names."""
    fmt = _format(path)
    return getattr(importlib.import_module(f"qimg.export.{fmt}"), f"read_{fmt}")(path)


def _format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        supported = ", ".join(FORMATS)
        shown = repr(suffix) if suffix else "(none)"
        raise InputError(f"unsupported layer file suffix {shown} for {os.fspath(path)!r}; supported: {supported}")
    return FORMATS[suffix]


def check_layers(layers: Sequence[Image.Image]) -> list[Image.Image]:
    """The layers as RGBA images of one size (RGB is converted); InputError naming the offending layer otherwise."""
    layers = [] if layers is None else list(layers)
    if not layers:
        raise InputError("no layers to export: the layer list is empty")
    checked = [_check_layer(index, layer) for index, layer in enumerate(layers)]
    size = checked[0].size
    if size[0] < 1 or size[1] < 1:
        raise InputError(f"layer 0 has an empty size {size[0]}x{size[1]}")
    for index, layer in enumerate(checked):
        if layer.size != size:
            raise InputError(
                f"layer sizes differ: layer 0 is {size[0]}x{size[1]}, layer {index} is {layer.size[0]}x{layer.size[1]}"
            )
    return checked


def _check_layer(index: int, layer: object) -> Image.Image:
    if not isinstance(layer, Image.Image):
        raise InputError(f"layer {index} is a {type(layer).__name__}, not a PIL image")
    if layer.mode == "RGBA":
        return layer
    if layer.mode == "RGB":
        return layer.convert("RGBA")
    raise InputError(f"layer {index} has mode {layer.mode!r}; layers must be RGBA (or RGB)")


def check_names(names: Sequence[str] | None, count: int) -> list[str]:
    """The given names as strings, or "Layer 1".."Layer N"; InputError on a wrong count or an empty name."""
    if names is None:
        return [f"Layer {index + 1}" for index in range(count)]
    names = list(names)
    if len(names) != count:
        raise InputError(f"got {len(names)} layer names for {count} layers")
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"layer name {index} is {name!r}; names must be non-empty strings")
    return names


def composite(layers: Sequence[Image.Image]) -> Image.Image:
    """The layers (bottom to top) merged with the Porter-Duff "over" operator, as an RGBA image."""
    layers = check_layers(layers)
    width, height = layers[0].size
    color = np.zeros((height, width, 3), dtype=np.float32)  # premultiplied
    alpha = np.zeros((height, width, 1), dtype=np.float32)
    for layer in layers:
        pixels = np.asarray(layer, dtype=np.float32) / 255.0
        layer_alpha = pixels[..., 3:4]
        color = pixels[..., :3] * layer_alpha + color * (1.0 - layer_alpha)
        alpha = layer_alpha + alpha * (1.0 - layer_alpha)
    straight = np.divide(color, alpha, out=np.zeros_like(color), where=alpha > 0)
    merged = np.concatenate([straight, alpha], axis=-1)
    return Image.fromarray(np.clip(np.rint(merged * 255.0), 0, 255).astype(np.uint8), "RGBA")


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def open_png(data: bytes, what: str) -> Image.Image:
    """Decode an image held in memory as RGBA; InputError naming `what` if it is not one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGBA")
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{what} is not a readable image: {error}") from error


def layer_filenames(names: Sequence[str], given: bool) -> list[str]:
    """PNG file names in stack order: layer_01.png... or, for given names, 01_<sanitised name>.png."""
    width = max(2, len(str(len(names))))
    if not given:
        return [f"layer_{index + 1:0{width}d}.png" for index in range(len(names))]
    return [f"{index + 1:0{width}d}_{_slug(name)}.png" for index, name in enumerate(names)]


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return slug[:64] or "layer"


def layers_and_names(layers: Sequence[Image.Image], names: Sequence[str] | None) -> tuple[list[Image.Image], list[str]]:
    """`check_layers` and `check_names` together, for writers called directly."""
    layers = check_layers(layers)
    return layers, check_names(names, len(layers))


def paste(canvas_size: tuple[int, int], image: Image.Image, x: int = 0, y: int = 0,
          opacity: float = 1.0) -> Image.Image:
    """`image` placed at (x, y) on a transparent canvas, its alpha scaled by `opacity`."""
    image = image.convert("RGBA")
    if opacity < 1.0:
        alpha = image.getchannel("A").point(lambda value: round(value * max(opacity, 0.0)))
        image.putalpha(alpha)
    if image.size == canvas_size and (x, y) == (0, 0):
        return image
    canvas = Image.new("RGBA", canvas_size, (0, 0, 0, 0))
    canvas.paste(image, (x, y))
    return canvas


def require(module: str, fmt: str):
    """Import an optional dependency of the `export` extra, with an install hint when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise QimgError(f"{fmt} export needs the {module!r} package: pip install 'qimg[export]'") from error
