"""Image plumbing shared by every pipeline: validation, sizing, PIL <-> tensor, latent packing, backgrounds."""

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


def pack(latents: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, (h/p)*(w/p), C*p*p]` tokens, row-major over the patch grid; a token's features are
    ordered (channel, dy, dx). Patch 1 (2.x) is one token per latent cell; v1 packs 2x2 patches."""
    if patch == 1:
        return latents.flatten(2).transpose(1, 2)
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the patch size {patch}")
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, h: int, w: int, patch: int = 1) -> torch.Tensor:
    """Inverse of `pack`: tokens -> `[B, C, h, w]` (h, w: the latent grid, not the patch grid)."""
    if patch == 1:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
    b, _, features = tokens.shape
    x = tokens.reshape(b, h // patch, w // patch, features // patch**2, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // patch**2, h, w)
