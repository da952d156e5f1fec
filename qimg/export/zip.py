"""`.zip` layer stacks: one PNG per layer, `manifest.json` listing them bottom to top, and `composite.png`."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Sequence

from PIL import Image

from qimg.errors import InputError
from qimg.atomic import atomic_write
from qimg.export.layers import composite, layer_filenames, layers_and_names, open_png, png_bytes

MANIFEST = "manifest.json"
COMPOSITE = "composite.png"


def write_zip(layers: Sequence[Image.Image], path: str | os.PathLike, names: Sequence[str] | None = None) -> None:
    """Write `layers` (bottom to top) as PNGs in a zip with a manifest and the composite."""
    given = names is not None
    layers, names = layers_and_names(layers, names)
    files = layer_filenames(names, given)
    manifest = {"layers": [{"file": file, "name": name} for file, name in zip(files, names)]}
    with atomic_write(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        for layer, file in zip(layers, files):
            archive.writestr(file, png_bytes(layer))  # PNG is already compressed
        archive.writestr(COMPOSITE, png_bytes(composite(layers)))
        archive.writestr(MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8"),
                         compress_type=zipfile.ZIP_DEFLATED)


def read_zip(path: str | os.PathLike) -> tuple[list[Image.Image], list[str]]:
    """The layers listed in a zip's manifest.json, bottom to top, and their names."""
    with zipfile.ZipFile(path) as archive:
        entries = _manifest_entries(archive, path)
        layers = [open_png(_member(archive, entry["file"], path), f"{os.fspath(path)!r}:{entry['file']}")
                  for entry in entries]
    sizes = {layer.size for layer in layers}
    if len(sizes) != 1:
        raise InputError(f"{os.fspath(path)!r}: layer images differ in size: {sorted(sizes)}")
    return layers, [str(entry.get("name") or entry["file"]) for entry in entries]


def _manifest_entries(archive: zipfile.ZipFile, path) -> list[dict]:
    try:
        manifest = json.loads(_member(archive, MANIFEST, path))
    except json.JSONDecodeError as error:
        raise InputError(f"{os.fspath(path)!r}: {MANIFEST} is not valid JSON: {error}") from error
    entries = manifest.get("layers") if isinstance(manifest, dict) else None
    if not entries or not all(isinstance(entry, dict) and entry.get("file") for entry in entries):
        raise InputError(f"{os.fspath(path)!r}: {MANIFEST} needs a non-empty 'layers' list of {{'file', 'name'}}")
    return entries


def _member(archive: zipfile.ZipFile, name: str, path) -> bytes:
    try:
        return archive.read(name)
    except KeyError as error:
        raise InputError(f"{os.fspath(path)!r} has no {name!r}") from error
