"""OpenRaster `.ora` layer stacks (https://www.openraster.org/, stack version 0.0.5).

A zip whose first entry is `mimetype` (stored, no extra field), then `stack.xml` (top-most layer first),
`data/*.png`, `mergedimage.png` and `Thumbnails/thumbnail.png` (at most 256x256).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
import zipfile
from typing import Sequence

from PIL import Image

from qimg.errors import InputError
from qimg.atomic import atomic_write
from qimg.export.layers import composite, layer_filenames, layers_and_names, open_png, paste, png_bytes

MIMETYPE = "image/openraster"
THUMBNAIL_MAX = 256


def write_ora(layers: Sequence[Image.Image], path: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Write `layers` (bottom to top) as an OpenRaster file."""
    given = names is not None
    layers, names = layers_and_names(layers, names)
    sources = [f"data/{name}" for name in layer_filenames(names, given)]
    merged = composite(layers)
    # PNGs are compressed already: store them; deflate only stack.xml.
    with atomic_write(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(zipfile.ZipInfo("mimetype"), MIMETYPE.encode("ascii"), compress_type=zipfile.ZIP_STORED)
        archive.writestr("stack.xml", stack_xml(layers[0].size, names, sources), compress_type=zipfile.ZIP_DEFLATED)
        for layer, source in zip(layers, sources):
            archive.writestr(source, png_bytes(layer))
        archive.writestr("mergedimage.png", png_bytes(merged))
        archive.writestr("Thumbnails/thumbnail.png", png_bytes(_thumbnail(merged)))


def stack_xml(size: tuple[int, int], names: list[str], sources: list[str]) -> bytes:
    """stack.xml for layers given bottom to top (written top to bottom, as the spec orders them)."""
    image = ET.Element("image", w=str(size[0]), h=str(size[1]), version="0.0.5")
    stack = ET.SubElement(image, "stack")
    for name, source in reversed(list(zip(names, sources))):
        ET.SubElement(stack, "layer", name=name, src=source, x="0", y="0", opacity="1.0",
                      visibility="visible", **{"composite-op": "svg:src-over"})
    return ET.tostring(image, encoding="UTF-8", xml_declaration=True)


def _thumbnail(image: Image.Image) -> Image.Image:
    thumbnail = image.copy()
    thumbnail.thumbnail((THUMBNAIL_MAX, THUMBNAIL_MAX))
    return thumbnail


def read_ora(path: str | os.PathLike) -> tuple[list[Image.Image], list[str]]:
    """The layers of an OpenRaster file, bottom to top, on full-size canvases with opacity folded into alpha.

    Nested stacks are flattened; composite ops and visibility are not applied.
    """
    with zipfile.ZipFile(path) as archive:
        root = _stack_root(archive, path)
        size = (_int_attr(root, "w", path), _int_attr(root, "h", path))
        entries = [_read_layer(archive, element, size, path) for element in root.iter("layer")]
    if not entries:
        raise InputError(f"{os.fspath(path)!r}: stack.xml lists no layers")
    entries.reverse()  # stack.xml lists the top-most first
    return [layer for layer, _ in entries], [name for _, name in entries]


def _stack_root(archive: zipfile.ZipFile, path) -> ET.Element:
    try:
        root = ET.fromstring(archive.read("stack.xml"))
    except KeyError as error:
        raise InputError(f"{os.fspath(path)!r} is not an OpenRaster file: no stack.xml") from error
    except ET.ParseError as error:
        raise InputError(f"{os.fspath(path)!r}: stack.xml is not valid XML: {error}") from error
    if root.tag != "image":
        raise InputError(f"{os.fspath(path)!r}: stack.xml root is <{root.tag}>, not <image>")
    return root


def _read_layer(archive: zipfile.ZipFile, element: ET.Element, size, path) -> tuple[Image.Image, str]:
    source = element.get("src")
    if not source:
        raise InputError(f"{os.fspath(path)!r}: a layer in stack.xml has no src")
    try:
        data = archive.read(source)
    except KeyError as error:
        raise InputError(f"{os.fspath(path)!r}: layer file {source!r} is missing") from error
    image = open_png(data, f"{os.fspath(path)!r}:{source}")
    x, y = _int_attr(element, "x", path, 0), _int_attr(element, "y", path, 0)
    opacity = _float_attr(element, "opacity", path, 1.0)
    return paste(size, image, x, y, opacity), element.get("name") or os.path.basename(source)


def _int_attr(element: ET.Element, name: str, path, default: int | None = None) -> int:
    return _number_attr(element, name, path, default, int)


def _float_attr(element: ET.Element, name: str, path, default: float) -> float:
    return _number_attr(element, name, path, default, float)


def _number_attr(element: ET.Element, name: str, path, default, kind):
    value = element.get(name)
    if value is None and default is not None:
        return default
    try:
        return kind(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"{os.fspath(path)!r}: <{element.tag}> has {name}={value!r}, not a number") from error
