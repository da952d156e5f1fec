"""Single pictures as PNG (with the generation parameters as text metadata), JPEG or WebP: one encoder for the CLI's
files and the server's outputs."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from qimg.atomic import atomic_write
from qimg.imaging import flatten

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
JPEG_QUALITY = 95


def encode_picture(image: Image.Image, fmt: str = "png", *, quality: int | None = None,
                   parameters: dict | None = None) -> bytes:
    """`image` as `fmt` bytes. PNG: `parameters` in a `qimg` text chunk as JSON (and `parameters` as plain text).
    JPEG: flattened onto white, `quality` (default 95). WebP: lossless unless a `quality` below 100 is given."""
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("qimg", json.dumps(parameters, sort_keys=True, default=str))
            info.add_text("parameters", ", ".join(f"{k}: {v}" for k, v in parameters.items() if v is not None))
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image = flatten(image) if image.mode == "RGBA" else image.convert("RGB")
        image.save(buf, format="JPEG", quality=JPEG_QUALITY if quality is None else max(1, min(100, quality)))
    elif fmt == "webp":
        lossless = quality is None or quality >= 100
        image.save(buf, format="WEBP", lossless=lossless, quality=100 if lossless else max(1, quality))
    else:
        raise ValueError(f"picture format must be one of {sorted(FORMATS)}, got {fmt!r}")
    return buf.getvalue()


def save_picture(image: Image.Image, path: str | os.PathLike, parameters: dict | None = None) -> None:
    """Write `image` atomically in the format its suffix names (.png keeps the parameters)."""
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: the suffix must be one of {sorted(SUFFIXES)}")
    data = encode_picture(image, fmt, parameters=parameters)
    with atomic_write(path) as handle:
        handle.write(data)


def read_png_parameters(path: str | os.PathLike) -> dict:
    """The `qimg` metadata of a PNG written here ({} when absent)."""
    with Image.open(path) as img:
        text = img.text.get("qimg") if hasattr(img, "text") else None
    return json.loads(text) if text else {}
