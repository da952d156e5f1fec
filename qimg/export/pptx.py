"""PowerPoint `.pptx` layer stacks through python-pptx.

One slide with the image's aspect ratio; one full-slide picture (PNG with alpha) per layer, added bottom to
top so that later shapes draw on top, each named after its layer.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

from PIL import Image

from qimg.errors import InputError
from qimg.atomic import atomic_write
from qimg.export.layers import layers_and_names, open_png, paste, png_bytes, require

EMU_PER_INCH = 914400
LONG_SIDE_EMU = 12192000  # 13.333 in, the width of a default 16:9 slide
MIN_SIDE_EMU = EMU_PER_INCH  # PowerPoint accepts slide sides from 1 to 56 inches
MAX_SIDE_EMU = 56 * EMU_PER_INCH
BLANK_LAYOUT = 6  # "Blank" in python-pptx's default template


def write_pptx(layers: Sequence[Image.Image], path: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Write `layers` (bottom to top) as a one-slide presentation of stacked full-slide pictures."""
    layers, names = layers_and_names(layers, names)
    width, height = slide_size(layers[0].size)
    presentation = require("pptx", "PPTX").Presentation()
    presentation.slide_width, presentation.slide_height = width, height
    slide = presentation.slides.add_slide(presentation.slide_layouts[BLANK_LAYOUT])
    with atomic_write(path) as handle:
        for layer, name in zip(layers, names):
            picture = slide.shapes.add_picture(io.BytesIO(png_bytes(layer)), 0, 0, width, height)
            picture.name = name
        presentation.save(handle)


def slide_size(size: tuple[int, int]) -> tuple[int, int]:
    """Slide (width, height) in EMU with the aspect of `size`: long side 13.333 in, short side at least 1 in."""
    long_px, short_px = max(size), min(size)
    long_emu = LONG_SIDE_EMU
    short_emu = round(long_emu * short_px / long_px)
    if short_emu < MIN_SIDE_EMU:
        short_emu = MIN_SIDE_EMU
        long_emu = round(short_emu * long_px / short_px)
    if long_emu > MAX_SIDE_EMU:
        raise InputError(f"image is {size[0]}x{size[1]}; too elongated for a PowerPoint slide (1 to 56 inches a side)")
    return (long_emu, short_emu) if size[0] >= size[1] else (short_emu, long_emu)


def read_pptx(path: str | os.PathLike) -> tuple[list[Image.Image], list[str]]:
    """The pictures on the first slide, in z-order (bottom to top), placed on a canvas in the first picture's scale.

    Crops and rotations of pictures are not applied.
    """
    pptx = require("pptx", "PPTX")
    presentation = pptx.Presentation(os.fspath(path))
    if len(presentation.slides) == 0:
        raise InputError(f"{os.fspath(path)!r} has no slides")
    picture_type = require("pptx.enum.shapes", "PPTX").MSO_SHAPE_TYPE.PICTURE
    shapes = [shape for shape in presentation.slides[0].shapes if shape.shape_type == picture_type]
    if not shapes:
        raise InputError(f"{os.fspath(path)!r}: the first slide has no pictures")
    images = [open_png(shape.image.blob, f"picture {shape.name!r}") for shape in shapes]
    scale = images[0].width / shapes[0].width  # pixels per EMU
    canvas = (round(presentation.slide_width * scale), round(presentation.slide_height * scale))
    layers = [_place(image, shape, canvas, scale) for image, shape in zip(images, shapes)]
    return layers, [shape.name for shape in shapes]


def _place(image: Image.Image, shape, canvas: tuple[int, int], scale: float) -> Image.Image:
    size = (max(1, round(shape.width * scale)), max(1, round(shape.height * scale)))
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return paste(canvas, image, round(shape.left * scale), round(shape.top * scale))
