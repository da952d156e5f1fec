"""Picture plumbing shared by the pipelines, the CLI, the server and training: validation, sizing, PIL <-> tensor,
backgrounds. (Latent token packing is in `qimg.models.latents`.)"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from qimg.errors import InputError

MAX_SIDE = 4096  # pixels, per side, for outputs and condition images after resizing
MAX_INPUT_PIXELS = 64 * 1024 * 1024  # decoded pixels accepted in a condition image


def fit_area(area: int, aspect: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with about `area` pixels at `aspect` = w/h, each rounded to a multiple of `multiple`."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    return round(width / multiple) * multiple, round(height / multiple) * multiple


def check_image(image, index: int = 0) -> Image.Image:
    """A PIL image (or HxWxC uint8 array) that can be used as a condition image, else InputError."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image {index + 1} is a {type(image).__name__}, not a picture")
    w, h = image.size
    if w < 1 or h < 1:
        raise InputError(f"image {index + 1} is empty ({w}x{h})")
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"image {index + 1} is {w}x{h} = {w * h} pixels; the limit is {MAX_INPUT_PIXELS}")
    return image


def check_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """Floor to a multiple of `multiple` (as the reference does) after checking the limits."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{name} must be an integer, got {value!r}")
        if value < multiple or value > MAX_SIDE:
            raise InputError(f"{name} {value} is out of range: it must be between {multiple} and {MAX_SIDE} pixels")
    return width // multiple * multiple, height // multiple * multiple


def to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """PIL image -> `[1, channels, H, W]` float32 in [-1, 1]; RGBA for 4 channels, RGB (on white) for 3."""
    if channels == 4:
        image = image.convert("RGBA")
    else:
        image = flatten(image.convert("RGBA")) if image.mode in ("RGBA", "LA", "P") else image.convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """`[B, C, H, W]` in [-1, 1] -> PIL images (RGBA for 4 channels), rounded as the reference rounds."""
    array = (images.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    array = (array * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def flatten(image: Image.Image, colour=(255, 255, 255)) -> Image.Image:
    """Composite an image with alpha onto an opaque colour (default white); RGB images pass through."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    base = Image.new("RGB", image.size, colour)
    base.paste(image, mask=image.getchannel("A"))
    return base
