"""OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`) and qimg's `/v1/images/layers`.

Every accepted request becomes a job (its id in the `x-qimg-job-id` header); the handler waits for it, streams
it (`stream=true`), or, with the header `Prefer: respond-async`, answers 202 with the queued job at once (the web
page does that, then follows `/v1/jobs/{id}/events`). Requests refused before a job exists (bad JSON/form, bad upload, full queue) carry no job id.

qimg extras (the official client sends them with `extra_body`): `seed`, `steps` (or `num_inference_steps`),
`negative_prompt`, `guidance_scale` (or `true_cfg_scale`), `cfg_normalize`, `sampler`, `preset`, `sigmas`,
`scheduler_config` (keys overriding the model's scheduler config), `shift` and `loras` (`[{"name", "scale"}]`,
names from `GET /v1/loras`; a JSON string in multipart forms); they become the library's
`GenerateOptions` / `LayersOptions`, which the job records. `quality`, `moderation`, `style`, `user` and
`input_fidelity` are accepted and ignored. `mask` is refused: Qwen-Image edits are instruction-based, so the
change is described in the prompt.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from qimg.options import GenerateOptions, LayersOptions
from qimg.serve import runner
from qimg.serve.errors import bad_request, error_response, from_exception, validation_error
from qimg.serve.store import SUCCEEDED, new_job_id
from qimg.serve.uploads import check_prompt, decode_image, parse_size
from qimg.serve.worker import Task

router = APIRouter()

JOB_HEADER = "x-qimg-job-id"
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}
KEEPALIVE_S = 15.0


class LoraChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=300)
    scale: float = Field(1.0, ge=-8, le=8)


class SamplingFields(BaseModel):
    """qimg's sampling extras, shared by every route (checked again, with the library's messages, by the options)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    loras: list[LoraChoice] | None = Field(None, max_length=8)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_form(cls, value):  # multipart forms send the list as JSON text
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"loras must be a JSON list of {{'name', 'scale'}} objects ({err.msg})") from None
        return value

    def lora_record(self, library) -> list[dict]:
        return library.specs([choice.model_dump() for choice in self.loras or []])

    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    guidance_scale: float | None = Field(None, ge=0, le=100)
    true_cfg_scale: float | None = Field(None, ge=0, le=100)
    cfg_normalize: bool | None = None
    sampler: str | None = None
    preset: str | None = None
    sigmas: list[float] | None = Field(None, min_length=1, max_length=1000)
    scheduler_config: dict | None = None
    shift: float | None = Field(None, gt=0, le=100)

    def sampling(self, negative_prompt: str | None) -> dict:
        """The sampling fields of the library's options."""
        return dict(steps=self.steps, seed=self.seed, negative_prompt=negative_prompt, cfg=requested_cfg(self),
                    cfg_normalize=self.cfg_normalize, sampler=self.sampler or "euler", preset=self.preset,
                    sigmas=self.sigmas, scheduler=self.scheduler_config, shift=self.shift)


class ImageOptions(SamplingFields):
    """Fields shared by generations and edits (OpenAI's, then qimg's extras)."""

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = "auto"
    quality: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: str | None = None
    style: str | None = None
    user: str | None = None
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)


class GenerationRequest(ImageOptions):
    pass


class EditRequest(ImageOptions):
    input_fidelity: str | None = None


class LayersRequest(SamplingFields):
    model: str | None = None
    layers: int = Field(4, ge=1)
    resolution: int | None = Field(None, ge=32, le=4096)
    prompt: str | None = None
    format: Literal["psd", "ora", "pptx", "zip", "json"] = "json"
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    recurse: int | None = Field(None, ge=0)
    caption_language: Literal["en", "zh"] = "en"


def services(request: Request):
    return request.app.state.services


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def validate(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


def requested_cfg(req) -> float | None:
    """`guidance_scale`, else its diffusers name `true_cfg_scale` (None: the model's default)."""
    return req.guidance_scale if req.guidance_scale is not None else req.true_cfg_scale


def image_spec(req: ImageOptions, limits, library, images=()) -> tuple[runner.Spec, dict]:
    """The job's options and its recorded parameters; the spec is rebuilt from the record, as a requeue does."""
    prompt = check_prompt(req.prompt, limits)
    negative = check_prompt(req.negative_prompt, limits, required=False, param="negative_prompt")
    if req.n > limits.max_n:
        raise bad_request(f"n is {req.n}; the limit is {limits.max_n}", param="n")
    width, height = parse_size(req.size)
    fmt = req.output_format or "png"
    if req.background == "transparent" and fmt == "jpeg":
        raise bad_request("background 'transparent' needs output_format 'png' or 'webp'", param="background")
    sampling = req.sampling(negative)
    if req.steps is None:
        sampling["steps"] = req.num_inference_steps
    options = GenerateOptions(prompt=prompt, images=tuple(images), width=width, height=height, n=req.n,
                              background=req.background, **sampling)
    params = {**options.to_record(), "output_format": fmt, "output_compression": req.output_compression,
              "response_format": req.response_format or "b64_json", "stream": bool(req.stream),
              "partial_images": req.partial_images or 0, "loras": req.lora_record(library)}
    return runner.spec_from_params("generate", params, list(images)), params


def entry(stored: runner.Stored, response_format: str, url_base: str) -> dict:
    if response_format == "url":
        return {"url": f"{url_base}/v1/files/{stored.record.id}", "revised_prompt": None}
    return {"b64_json": stored.b64(), "revised_prompt": None}


def images_body(result: runner.ImagesResult, req: ImageOptions, url_base: str) -> dict:
    fmt = req.output_format or "png"
    return {"created": int(time.time()),
            "data": [entry(s, req.response_format or "b64_json", url_base) for s in result.images],
            "background": "transparent" if req.background == "transparent" else "opaque",
            "output_format": fmt, "quality": req.quality if req.quality in ("low", "medium", "high") else "auto",
            "size": f"{result.width}x{result.height}", "usage": USAGE}


def sse(event: str, data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"event: {event}\ndata: {text}\n\n"


async def next_event(sub):
    """The next event, or None after KEEPALIVE_S without one."""
    try:
        return await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
    except asyncio.TimeoutError:
        return None


def wants_async(request: Request) -> bool:
    """`Prefer: respond-async` (RFC 7240): answer 202 with the queued job at once; follow it on /v1/jobs/{id}."""
    return any(p.strip().lower() == "respond-async" for p in request.headers.get("prefer", "").split(","))


async def precheck(svc, task: Task) -> None:
    """When the model is loaded, settle the request against it (sizes, image counts, presets) before a job exists,
    so that a request it refuses is a 400 with no job behind it."""
    entry = svc.models.get(task.model)
    plan = getattr(entry.pipeline, "plan", None) if entry is not None else None
    if plan is not None:
        await run_in_threadpool(plan, task.spec.options)


async def run_job(request: Request, task: Task, respond, *, stream: bool = False, partials: int = 0,
                  prefix: str = "image_generation", stream_meta: dict | None = None):
    svc = services(request)
    await precheck(svc, task)
    sub = svc.bus.subscribe(task.job_id, partials=partials if stream else 0)
    try:
        await run_in_threadpool(svc.worker.submit, task)  # writes the input files: off the event loop
    except BaseException:
        svc.bus.unsubscribe(sub)
        raise
    headers = {JOB_HEADER: task.job_id}
    if wants_async(request):
        svc.bus.unsubscribe(sub)
        job = svc.store.get(task.job_id)
        return JSONResponse(job.to_json(base_url(request), svc.bus.progress(job.id)), status_code=202,
                            headers={**headers, "location": f"/v1/jobs/{task.job_id}"})
    if stream:
        return StreamingResponse(stream_job(svc, sub, prefix, stream_meta or {}), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    try:
        while True:
            event = await sub.queue.get()
            if event["type"] == "done":
                break
    finally:
        svc.bus.unsubscribe(sub)
    if event["status"] == SUCCEEDED:
        return JSONResponse(respond(event["outcome"]), headers=headers)
    return error_response(from_exception(event["outcome"]), headers=headers)


async def stream_job(svc, sub, prefix: str, meta: dict):
    """OpenAI's image streaming: `<prefix>.partial_image` events, then `<prefix>.completed` per image."""
    try:
        while True:
            event = await next_event(sub)
            if event is None:
                yield ": keep-alive\n\n"
                continue
            if event["type"] == "partial":
                yield sse(f"{prefix}.partial_image", {
                    "type": f"{prefix}.partial_image", "b64_json": event["b64_json"],
                    "partial_image_index": event["index"], "created_at": int(time.time()), "size": event["size"],
                    **meta})
            elif event["type"] == "done":
                if event["status"] == SUCCEEDED:
                    result = event["outcome"]
                    for stored in result.images:
                        yield sse(f"{prefix}.completed", {
                            "type": f"{prefix}.completed", "b64_json": stored.b64(), "created_at": int(time.time()),
                            "size": f"{result.width}x{result.height}", **meta, "usage": USAGE})
                else:
                    err = from_exception(event["outcome"])
                    yield sse("error", {"type": "error", **err.body()})
                yield "data: [DONE]\n\n"
                return
    finally:
        svc.bus.unsubscribe(sub)


def stream_meta(req: ImageOptions) -> dict:
    return {"quality": req.quality if req.quality in ("low", "medium", "high") else "auto",
            "background": "transparent" if req.background == "transparent" else "opaque",
            "output_format": req.output_format or "png"}


@router.post("/v1/images/generations")
async def generations(req: GenerationRequest, request: Request):
    svc = services(request)
    model = svc.models.pick(req.model, "generate")
    spec, params = image_spec(req, svc.settings.limits, svc.loras)
    params["warning"] = svc.models.get(model).warning(req.prompt, editing=False)
    task = Task(new_job_id(), "generate", model, spec, params)
    url_base = base_url(request)
    return await run_job(request, task, lambda result: images_body(result, req, url_base), stream=bool(req.stream),
                         partials=req.partial_images or 0, prefix="image_generation", stream_meta=stream_meta(req))


async def read_form(request: Request, limits, file_fields: tuple[str, ...]):
    """(scalar fields, {file field: [UploadFile]}); repeated scalars and files in scalar fields are refused."""
    form = await request.form(max_files=limits.max_images * 2 + 2, max_fields=64,
                              max_part_size=limits.max_prompt_chars * 4 + 4096)
    scalars, files = {}, {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            base = key[:-2] if key.endswith("[]") else key
            if base not in file_fields:
                raise bad_request(f"unexpected file in field {key!r}; files go in {', '.join(file_fields)}",
                                  param=key)
            files.setdefault(base, []).append(value)
        else:
            if key.endswith("[]") and key[:-2] in file_fields or key in file_fields:
                raise bad_request(f"{key!r} must be an uploaded file (multipart/form-data), not text", param=key)
            if key in scalars:
                raise bad_request(f"parameter {key!r} is given more than once", param=key)
            scalars[key] = value
    return form, scalars, files


async def read_upload(upload: UploadFile, label: str, limits, param: str):
    data = await upload.read(limits.max_image_bytes + 1)
    return await run_in_threadpool(decode_image, data, label, limits, param)  # decoding is CPU work


@router.post("/v1/images/edits")
async def edits(request: Request):
    svc = services(request)
    limits = svc.settings.limits
    form, scalars, files = await read_form(request, limits, ("image", "mask"))
    try:
        req = validate(EditRequest, scalars)
        if files.get("mask"):
            raise bad_request("mask is not supported: Qwen-Image edits follow the instruction in the prompt; describe "
                              "the region to change there instead of sending a mask", param="mask",
                              code="mask_not_supported")
        uploads = files.get("image", [])
        if not uploads:
            raise bad_request("missing required parameter: 'image' (1 to "
                              f"{limits.max_images} image files as 'image' or 'image[]')", param="image")
        if len(uploads) > limits.max_images:
            raise bad_request(f"too many images: {len(uploads)} given, at most {limits.max_images}", param="image",
                              code="too_many_images")
        decoded = [await read_upload(u, f"image {i + 1} ({u.filename or 'unnamed'})", limits, "image")
                   for i, u in enumerate(uploads)]
    finally:
        await form.close()
    model = svc.models.pick(req.model, "edit")
    spec, params = image_spec(req, limits, svc.loras, [d.image for d in decoded])
    params["warning"] = svc.models.get(model).warning(req.prompt, editing=True)
    task = Task(new_job_id(), "edit", model, spec, params, inputs=decoded)
    url_base = base_url(request)
    return await run_job(request, task, lambda result: images_body(result, req, url_base), stream=bool(req.stream),
                         partials=req.partial_images or 0, prefix="image_edit", stream_meta=stream_meta(req))


@router.post("/v1/images/layers")
async def layers(request: Request):
    """Decompose one picture into RGBA layers (bottom to top), optionally exported as PSD, ORA, PPTX or ZIP.

    Answer: OpenAI's envelope with one `data` entry per layer (PNG, `b64_json` or `url`), plus `file` (the
    exported stack: id, url, bytes) when `format` is not "json".
    """
    svc = services(request)
    limits = svc.settings.limits
    form, scalars, files = await read_form(request, limits, ("image",))
    try:
        req = validate(LayersRequest, scalars)
        uploads = files.get("image", [])
        if len(uploads) != 1:
            raise bad_request(f"layers takes exactly one 'image' file, got {len(uploads)}", param="image")
        upload = await read_upload(uploads[0], f"image ({uploads[0].filename or 'unnamed'})", limits, "image")
    finally:
        await form.close()
    if req.layers > limits.max_layers:
        raise bad_request(f"layers is {req.layers}; the limit is {limits.max_layers}", param="layers")
    if req.recurse is not None and req.recurse >= req.layers:
        raise bad_request(f"recurse is {req.recurse}; it must be the index of a returned layer, 0 to "
                          f"{req.layers - 1}", param="recurse")
    prompt = check_prompt(req.prompt, limits, required=False)
    negative = check_prompt(req.negative_prompt, limits, required=False, param="negative_prompt")
    model = svc.models.pick(req.model, "layers")
    options = LayersOptions(image=upload.image, layers=req.layers, resolution=req.resolution, prompt=prompt,
                            recurse=req.recurse, caption_language=req.caption_language, **req.sampling(negative))
    params = {**options.to_record(), "format": req.format, "response_format": req.response_format or "b64_json",
              "loras": req.lora_record(svc.loras)}
    spec = runner.spec_from_params("layers", params, [upload.image])
    task = Task(new_job_id(), "layers", model, spec, params, inputs=[upload])
    url_base = base_url(request)

    def respond(result: runner.LayersResult) -> dict:
        return {"created": int(time.time()),
                "data": [{**entry(s, req.response_format or "b64_json", url_base), "index": i}
                         for i, s in enumerate(result.layers)],
                "background": "transparent", "output_format": "png", "size": f"{result.width}x{result.height}",
                "file": result.export.to_json(url_base) if result.export else None}

    return await run_job(request, task, respond)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: list[str] = Field(min_length=1, max_length=64)
    format: Literal["psd", "ora", "pptx", "zip"]
    names: list[str] | None = None


@router.post("/v1/images/layers/export")
async def export_stack(req: ExportRequest, request: Request):
    """Write stored layer PNGs (file ids, bottom to top: a reordered or filtered stack) as one PSD/ORA/PPTX/ZIP."""
    from qimg.serve.store import FILE_ID

    svc = services(request)
    limits = svc.settings.limits
    if req.names is not None and (len(req.names) != len(req.layers) or any(len(n) > 200 for n in req.names)):
        raise bad_request("names must give one name (at most 200 characters) per layer", param="names")
    paths = []
    for i, file_id in enumerate(req.layers):
        found = svc.files.path(file_id) if FILE_ID.fullmatch(file_id) else None
        if found is None or found[0].role not in ("layer", "output") or found[0].mime != "image/png":
            raise bad_request(f"layers[{i}] is not a stored layer or output PNG: {file_id!r}", param="layers")
        paths.append(found)

    def work():
        from qimg.export import export_layers

        images = [decode_image(path.read_bytes(), f"layer {i}", limits).image for i, (_, path) in enumerate(paths)]
        mime, ext = runner.LAYER_FORMATS[req.format]
        try:
            return svc.files.put_with(lambda out: export_layers(images, out, req.names), ext=ext, mime=mime,
                                      job_id=paths[0][0].job_id, role="export")
        except ModuleNotFoundError as err:
            raise bad_request(f"format {req.format!r} needs the package {err.name!r}: install qimg with the export "
                              f"extra (pip install 'qimg[export]')") from None

    record = await run_in_threadpool(work)
    return record.to_json(base_url(request))
