"""Checking what clients send: uploaded pictures (bytes, format, pixel count before decoding), sizes, prompts."""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

from qimg.serve.errors import ApiError, bad_request
from qimg.serve.settings import Limits

FORMATS = {"PNG": ("image/png", ".png"), "JPEG": ("image/jpeg", ".jpg"), "WEBP": ("image/webp", ".webp")}
_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*$")


def human_bytes(n: int) -> str:
    mib = n / 1024 / 1024
    if mib >= 1:
        return f"{mib:.0f} MiB" if mib == int(mib) else f"{mib:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


class Encoded:
    """A checked picture as the bytes it came in (what a queued job holds: no pixels)."""

    def __init__(self, data: bytes, fmt: str):
        self.data, self.format = data, fmt
        self.mime, self.ext = FORMATS[fmt]


class Upload(Encoded):
    """A checked, decoded picture with the bytes it came from."""

    def __init__(self, image: Image.Image, data: bytes, fmt: str):
        super().__init__(data, fmt)
        self.image = image

    def encoded(self) -> Encoded:
        return Encoded(self.data, self.format)


def decode_image(data: bytes, label: str, limits: Limits, param: str = "image", *, convert: bool = True) -> Upload:
    """PNG, JPEG or WebP only; the pixel count is checked from the header before any pixel is decoded. Every
    pixel is decoded (a truncated file is refused here); `convert=False` keeps the file's own mode (a 1-bit PNG
    stays one byte per pixel instead of four), enough to check the request."""
    if not data:
        raise bad_request(f"{label} is empty", param=param, code="invalid_image")
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"{label} is {human_bytes(len(data))}; the limit is {human_bytes(limits.max_image_bytes)}",
                          param=param, code="image_too_large")
    try:
        img = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError as err:
        raise bad_request(f"{label} is refused as a decompression bomb: {err}", param=param,
                          code="image_too_large") from None
    except UnidentifiedImageError:
        raise bad_request(f"{label} is not a PNG, JPEG or WebP image", param=param, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise bad_request(f"{label} could not be read: {err}", param=param, code="invalid_image") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise bad_request(f"{label} is empty ({w}x{h})", param=param, code="invalid_image")
    if w * h > limits.max_image_pixels:
        raise bad_request(f"{label} is {w}x{h} = {w * h:,} pixels; the limit is {limits.max_image_pixels:,} pixels",
                          param=param, code="image_too_large")
    fmt = img.format
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise bad_request(f"{label} is truncated or corrupt ({fmt}): {err}", param=param,
                          code="invalid_image") from None
    if convert and img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    return Upload(img, data, fmt)


def parse_size(size: str | None, param: str = "size") -> tuple[int | None, int | None]:
    """"auto" (or nothing) -> (None, None): the model's default, or the input image's aspect for edits."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(str(size))
    if not match:
        raise bad_request(f"size must be 'auto' or WIDTHxHEIGHT such as '1024x1024', got {size!r}", param=param,
                          code="invalid_size")
    w, h = int(match.group(1)), int(match.group(2))
    if w < 1 or h < 1:
        raise bad_request(f"size {size!r} has a zero side", param=param, code="invalid_size")
    return w, h


def check_prompt(prompt, limits: Limits, *, required: bool = True, param: str = "prompt") -> str | None:
    if prompt is None or (isinstance(prompt, str) and not prompt.strip() and required):
        if required:
            raise bad_request(f"{param} is required and must not be empty", param=param)
        return None
    if not isinstance(prompt, str):
        raise bad_request(f"{param} must be a string", param=param)
    if len(prompt) > limits.max_prompt_chars:
        raise bad_request(f"{param} is {len(prompt)} characters; the limit is {limits.max_prompt_chars}",
                          param=param, code="prompt_too_long")
    return prompt


def queue_full(retry_after: int) -> ApiError:
    return ApiError(429, f"the job queue is full; retry in about {retry_after} s", code="queue_full",
                    headers={"retry-after": str(retry_after)})
