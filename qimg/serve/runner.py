"""What a job does once the worker runs it: call the pipeline, encode and store the outputs.

Nothing here knows about HTTP; the specs are plain data checked by the routes.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from qimg.errors import InputError
from qimg.export.picture import encode_picture
from qimg.options import GenerateOptions, LayersOptions
from qimg.serve.store import OUTPUT_ROLES, FileRecord, FileStore
from qimg.serve.uploads import parse_size

OUTPUT_FORMATS = {"png": ("PNG", "image/png", ".png"), "jpeg": ("JPEG", "image/jpeg", ".jpg"),
                  "webp": ("WEBP", "image/webp", ".webp")}
LAYER_FORMATS = {"psd": ("image/vnd.adobe.photoshop", ".psd"), "ora": ("image/openraster", ".ora"),
                 "pptx": ("application/vnd.openxmlformats-officedocument.presentationml.presentation", ".pptx"),
                 "zip": ("application/zip", ".zip")}


@dataclass
class OutputOptions:
    format: str = "png"  # png | jpeg | webp for pictures; json (layers only) | psd | ora | pptx | zip for layers
    compression: int | None = None  # 0..100 for jpeg/webp (100 = best quality)


@dataclass
class Spec:
    """What a job runs: the library's request options (GenerateOptions or LayersOptions) and how to store it."""

    options: GenerateOptions | LayersOptions
    output: OutputOptions = field(default_factory=OutputOptions)
    loras: list[dict] = field(default_factory=list)  # [{"name", "scale"}] from the server's LoRA directory


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
    batch: int = 1  # requests denoised together with this one (itself included)

    def summary(self) -> dict:
        return {"width": self.width, "height": self.height, "seed": self.seed, "seconds": self.seconds,
                "steps": self.steps, "n": len(self.images), "batch": self.batch}


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


OUTPUT_KEYS = ("output_format", "output_compression", "format")


def stored_result(job, files: FileStore) -> ImagesResult | LayersResult:
    """A finished job's result, rebuilt from its row and its stored files (the job ran in another process)."""
    def load(record: FileRecord) -> Stored:
        found = files.path(record.id)
        if found is None:
            raise FileNotFoundError(f"output {record.id} of job {job.id} is missing")
        return Stored(record, found[1].read_bytes())

    r = job.result
    by_role = {role: sorted((f for f in job.files if f.role == role), key=lambda f: f.index)
               for role in OUTPUT_ROLES}
    if job.kind == "layers":
        return LayersResult([load(f) for f in by_role["layer"]], (by_role["export"] or [None])[0], r["width"],
                            r["height"], r["format"])
    return ImagesResult([load(f) for f in by_role["output"]], r["width"], r["height"], r.get("seed"),
                        r.get("seconds"), r.get("steps"), r.get("batch", 1))


def spec_from_params(kind: str, params: dict, images: list[Image.Image]) -> Spec:
    """A job's spec from the parameters recorded in its row and its input pictures: the routes build every spec
    this way, so a job still queued when the server stopped is rebuilt exactly when it is requeued."""
    params = dict(params)
    if "guidance_scale" in params and "cfg" not in params:  # rows written before the options were recorded
        params["cfg"] = params.pop("guidance_scale")
    if "size" in params and "width" not in params:
        params["width"], params["height"] = parse_size(params.pop("size"))
    loras = list(params.get("loras") or [])
    if kind == "layers":
        return Spec(LayersOptions.from_record(params, images), OutputOptions(params.get("format", "json")), loras)
    return Spec(GenerateOptions.from_record(params, images),
                OutputOptions(params.get("output_format", "png"), params.get("output_compression")), loras)


def encode_image(image: Image.Image, options: OutputOptions, parameters: dict | None = None) -> bytes:
    return encode_picture(image, options.format, quality=options.compression, parameters=parameters)


def preview_b64(image: Image.Image, side: int) -> str:
    """A small PNG of a preview for progress events."""
    thumb = image.copy()
    thumb.thumbnail((side, side))
    buf = io.BytesIO()
    thumb.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def run_images(pipe, spec: Spec, *, job_id: str, files: FileStore, progress: Callable,
               cancel: Callable[[], bool]) -> ImagesResult:
    out = pipe.generate(spec.options.with_runtime(progress=progress, cancel=cancel))
    return store_images(out, spec, job_id=job_id, files=files)


def store_images(out: list[Image.Image], spec: Spec, *, job_id: str, files: FileStore) -> ImagesResult:
    """Encode and store a job's pictures (with their parameters and the job id in the metadata)."""
    mime, ext = OUTPUT_FORMATS[spec.output.format][1:]
    stored = []
    for i, image in enumerate(out):
        params = {**(image.info.get("qimg") or {}), "job_id": job_id}
        data = encode_image(image, spec.output, params)
        stored.append(Stored(files.put_bytes(data, ext=ext, mime=mime, job_id=job_id, role="output", index=i), data))
    meta = (out[0].info.get("qimg") or {}) if out else {}
    return ImagesResult(stored, out[0].width, out[0].height, meta.get("seed"), meta.get("seconds"), meta.get("steps"),
                        meta.get("batch", 1))


def run_layers(pipe, spec: Spec, *, job_id: str, files: FileStore, progress: Callable,
               cancel: Callable[[], bool]) -> LayersResult:
    layers = pipe.layers(spec.options.with_runtime(progress=progress, cancel=cancel))
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
    fmt = spec.output.format
    if fmt in LAYER_FORMATS:
        from qimg.export import export_layers

        mime, ext = LAYER_FORMATS[fmt]
        try:
            export = files.put_with(lambda path: export_layers(layers, path), ext=ext, mime=mime, job_id=job_id,
                                    role="export")
        except ModuleNotFoundError as err:
            raise InputError(f"format {fmt!r} needs the package {err.name!r}: "
                             f"install qimg with the export extra (pip install 'qimg[export]')") from None
    return LayersResult(stored, export, layers[0].width, layers[0].height, fmt)
