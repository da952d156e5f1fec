"""What a job does once the worker runs it: call the pipeline, encode and store the outputs.

Nothing here knows about HTTP; the specs are plain data checked by the routes.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image, PngImagePlugin

from qimg.errors import InputError
from qimg.serve.store import FileRecord, FileStore
from qimg.serve.uploads import parse_size

OUTPUT_FORMATS = {"png": ("PNG", "image/png", ".png"), "jpeg": ("JPEG", "image/jpeg", ".jpg"),
                  "webp": ("WEBP", "image/webp", ".webp")}
LAYER_FORMATS = {"psd": ("image/vnd.adobe.photoshop", ".psd"), "ora": ("image/openraster", ".ora"),
                 "pptx": ("application/vnd.openxmlformats-officedocument.presentationml.presentation", ".pptx"),
                 "zip": ("application/zip", ".zip")}


@dataclass
class OutputOptions:
    format: str = "png"  # png | jpeg | webp
    compression: int | None = None  # 0..100 for jpeg/webp (100 = best quality)
    background: str | None = None  # None (auto) | "transparent" | "opaque"


@dataclass
class ImageSpec:
    """generate (no images) or edit (1..10 images)."""

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    cfg: float | None = None
    n: int = 1
    output: OutputOptions = field(default_factory=OutputOptions)


@dataclass
class LayersSpec:
    image: Image.Image
    layers: int = 4
    resolution: int | None = None
    prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    format: str = "json"  # json (layers only) | psd | ora | pptx | zip
    cfg: float | None = None
    negative_prompt: str | None = None
    cfg_normalize: bool = False
    recurse: int | None = None  # split returned layer i again, its sub-layers in its place
    caption_language: str = "en"  # of the automatic caption when there is no prompt


@dataclass
class Stored:
    record: FileRecord
    data: bytes

    def b64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


@dataclass
class ImagesResult:
    images: list[Stored]
    width: int
    height: int
    seed: int | None
    seconds: float | None
    steps: int | None = None

    def summary(self) -> dict:
        return {"width": self.width, "height": self.height, "seed": self.seed, "seconds": self.seconds,
                "steps": self.steps, "n": len(self.images)}


@dataclass
class LayersResult:
    layers: list[Stored]
    export: FileRecord | None
    width: int
    height: int
    format: str

    def summary(self) -> dict:
        return {"width": self.width, "height": self.height, "layers": len(self.layers), "format": self.format,
                "export": self.export.id if self.export else None}


def spec_from_params(kind: str, params: dict, images: list[Image.Image]) -> ImageSpec | LayersSpec:
    """A job's spec from the parameters recorded in its row and its input pictures: the routes build every spec
    this way, so a job still queued when the server stopped is rebuilt exactly when it is requeued."""
    cfg = params.get("guidance_scale")
    if kind == "layers":
        return LayersSpec(images[0], layers=params.get("layers", 4), resolution=params.get("resolution"),
                          prompt=params.get("prompt"), steps=params.get("steps"), seed=params.get("seed"),
                          format=params.get("format", "json"), cfg=cfg, negative_prompt=params.get("negative_prompt"),
                          cfg_normalize=bool(params.get("cfg_normalize")), recurse=params.get("recurse"),
                          caption_language=params.get("caption_language", "en"))
    width, height = parse_size(params.get("size"))
    background = params.get("background")
    output = OutputOptions(params.get("output_format", "png"), params.get("output_compression"),
                           None if background in (None, "auto") else background)
    return ImageSpec(prompt=params["prompt"], images=list(images), width=width, height=height,
                     steps=params.get("steps"), seed=params.get("seed"), negative_prompt=params.get("negative_prompt"),
                     cfg=cfg, n=params.get("n", 1), output=output)


def encode_image(image: Image.Image, options: OutputOptions, parameters: dict | None = None) -> bytes:
    fmt = OUTPUT_FORMATS[options.format][0]
    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("qimg", json.dumps(parameters, sort_keys=True, default=str))
        image.save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()
    quality = 95 if options.compression is None else max(1, min(100, options.compression))
    if fmt == "JPEG":
        from qimg.pipelines.images import flatten

        image = flatten(image) if image.mode == "RGBA" else image.convert("RGB")
        image.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format="WEBP", quality=quality, lossless=options.compression in (None, 100))
    return buf.getvalue()


def preview_b64(image: Image.Image, side: int) -> str:
    """A small PNG of a preview for progress events."""
    thumb = image.copy()
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_images(pipe, spec: ImageSpec, *, job_id: str, files: FileStore, progress: Callable,
               should_stop: Callable[[], bool]) -> ImagesResult:
    background = spec.output.background
    out = pipe.generate(spec.prompt, images=spec.images or None, width=spec.width, height=spec.height,
                        steps=spec.steps, seed=spec.seed, negative_prompt=spec.negative_prompt, cfg=spec.cfg,
                        n=spec.n, background=background, progress=progress, should_stop=should_stop)
    mime, ext = OUTPUT_FORMATS[spec.output.format][1:]
    stored = []
    for i, image in enumerate(out):
        params = {**(image.info.get("qimg") or {}), "job_id": job_id}
        data = encode_image(image, spec.output, params)
        stored.append(Stored(files.put_bytes(data, ext=ext, mime=mime, job_id=job_id, role="output", index=i), data))
    meta = (out[0].info.get("qimg") or {}) if out else {}
    return ImagesResult(stored, out[0].width, out[0].height, meta.get("seed"), meta.get("seconds"), meta.get("steps"))


def run_layers(pipe, spec: LayersSpec, *, job_id: str, files: FileStore, progress: Callable,
               should_stop: Callable[[], bool]) -> LayersResult:
    layers = pipe.layers(spec.image, layers=spec.layers, resolution=spec.resolution, prompt=spec.prompt,
                         steps=spec.steps, seed=spec.seed, cfg=spec.cfg, negative_prompt=spec.negative_prompt,
                         cfg_normalize=spec.cfg_normalize, recurse=spec.recurse,
                         caption_language=spec.caption_language, progress=progress, should_stop=should_stop)
    layers = [layer if layer.mode == "RGBA" else layer.convert("RGBA") for layer in layers]
    if not layers:
        raise InputError("the model returned no layers")
    stored = []
    for i, layer in enumerate(layers):
        params = {**(layer.info.get("qimg") or {}), "job_id": job_id, "layer": i, "of": len(layers)}
        data = encode_image(layer, OutputOptions("png"), params)
        stored.append(Stored(files.put_bytes(data, ext=".png", mime="image/png", job_id=job_id, role="layer",
                                             index=i), data))
    export = None
    if spec.format in LAYER_FORMATS:
        from qimg.export import export_layers

        mime, ext = LAYER_FORMATS[spec.format]
        try:
            export = files.put_with(lambda path: export_layers(layers, path), ext=ext, mime=mime, job_id=job_id,
                                    role="export")
        except ModuleNotFoundError as err:
            raise InputError(f"format {spec.format!r} needs the package {err.name!r}: "
                             f"install qimg with the export extra (pip install 'qimg[export]')") from None
    return LayersResult(stored, export, layers[0].width, layers[0].height, spec.format)
