"""Photoshop `.psd` layer stacks through psd-tools.

The file holds one named pixel layer per input layer (bottom to top, as Photoshop lists them from the
bottom) and the merged composite, rendered by psd-tools and flagged as carrying transparency (negative
layer count), so viewers that only read the merged image see the transparent areas too.

Precision: the merged image is stored 8-bit and, as the format requires, matted over white where it is
semi-transparent; reading it back un-mattes it, so its colour is exact (within 1/255) where the composite
is opaque, and only approximate where the composite alpha is low. The layers themselves are lossless.
"""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

from qimg.errors import InputError
from qimg.atomic import atomic_write
from qimg.export.layers import layers_and_names, paste, require

PSD_MAX_SIDE = 30000  # the PSD format's limit; larger documents need PSB


def write_psd(layers: Sequence[Image.Image], path: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Write `layers` (bottom to top) as a layered PSD with a merged composite."""
    layers, names = layers_and_names(layers, names)
    _check_size(layers[0].size)
    document = _build(layers, names)
    with atomic_write(path) as handle:
        document.save(handle)


def _check_size(size: tuple[int, int]) -> None:
    if max(size) > PSD_MAX_SIDE:
        raise InputError(f"image is {size[0]}x{size[1]}; PSD files allow at most {PSD_MAX_SIDE} pixels a side")


def _build(layers: list[Image.Image], names: list[str]):
    psd_tools = require("psd_tools", "PSD")
    pixel_layer = require("psd_tools.api.layers", "PSD").PixelLayer
    document = psd_tools.PSDImage.frompil(Image.new("RGBA", layers[0].size, (0, 0, 0, 0)))
    for layer, name in zip(layers, names):
        pixel_layer.frompil(layer, document, name=name)
    _flag_merged_transparency(document)
    return document


def _flag_merged_transparency(document) -> None:
    """Negative layer count: the merged image's first extra channel is its alpha (PSD spec).

    psd-tools exposes no setter for this; without it the saved composite drops its alpha channel.
    """
    layer_info = document._record.layer_and_mask_information.layer_info
    if layer_info is None or layer_info.layer_count == 0:
        raise RuntimeError("psd-tools did not record the layers; cannot flag the merged transparency")
    layer_info.layer_count = -abs(layer_info.layer_count)


def read_psd(path: str | os.PathLike) -> tuple[list[Image.Image], list[str]]:
    """The pixel layers of a PSD, bottom to top, each on a full-size canvas with its opacity folded into alpha.

    Groups are flattened; blend modes, masks, effects and visibility are not applied.
    """
    document = require("psd_tools", "PSD").PSDImage.open(path)
    layers, names = [], []
    for layer in document.descendants():
        if layer.is_group():
            continue
        layers.append(_layer_canvas(layer, document.size))
        names.append(layer.name)
    if not layers:
        raise InputError(f"{os.fspath(path)!r} has no layers")
    return layers, names


def read_psd_composite(path: str | os.PathLike) -> Image.Image | None:
    """The merged image stored in a PSD (RGBA), or None when it has none."""
    image = require("psd_tools", "PSD").PSDImage.open(path).topil()
    return None if image is None else image.convert("RGBA")


def _layer_canvas(layer, size: tuple[int, int]) -> Image.Image:
    image = layer.topil() if layer.has_pixels() else None
    if image is None:
        return Image.new("RGBA", size, (0, 0, 0, 0))
    return paste(size, image, layer.left, layer.top, layer.opacity / 255.0)
