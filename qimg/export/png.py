"""PNG output with the generation parameters as text metadata."""

from __future__ import annotations

import json
import os

from PIL import Image, PngImagePlugin

from qimg.export.atomic import atomic_write


def save_png(image: Image.Image, path: str | os.PathLike, parameters: dict | None = None) -> None:
    """Write `image` atomically; `parameters` go in a `qimg` tEXt chunk as JSON (and `parameters` as plain text)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("qimg", json.dumps(parameters, sort_keys=True, default=str))
        info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in parameters.items() if v is not None))
    with atomic_write(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)


def read_png_parameters(path: str | os.PathLike) -> dict:
    """The `qimg` metadata of a PNG written by `save_png` ({} when absent)."""
    with Image.open(path) as img:
        text = img.text.get("qimg") if hasattr(img, "text") else None
    return json.loads(text) if text else {}
