"""OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`) and qimg's `/v1/images/layers`.

Every accepted request becomes a job (its id in the `x-qimg-job-id` header); the handler waits for it, streams
it (`stream=true`), or, with the header `Prefer: respond-async`, answers 202 with the queued job at once (the web
page does that, then follows `/v1/jobs/{id}/events`). Requests refused before a job exists (bad JSON/form, bad upload,
over the cost budget, full queue) carry no job id. A client that disconnects from a waiting or streaming request
cancels its job.

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

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from qimg.options import GenerateOptions, LayersOptions
from qimg.serve import runner
from qimg.serve.budget import check_cost
from qimg.serve.errors import SafeJSONResponse, bad_request, error_response, from_exception
from qimg.serve.requests import (EditRequest, ExportRequest, GenerationRequest, ImageOptions, LayersRequest,
                                 form_body, json_body, read_form, read_json, validate)
from qimg.serve.store import SUCCEEDED, new_job_id
from qimg.serve.uploads import check_prompt, decode_image, human_bytes, parse_size
from qimg.serve.worker import Task

router = APIRouter()

JOB_HEADER = "x-qimg-job-id"
USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}
KEEPALIVE_S = 15.0
DISCONNECT_POLL_S = 0.25


def services(request: Request):
    return request.app.state.services


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


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


async def precheck(svc, model: str, kind: str, options) -> int | None:
    """When the model is loaded, settle the request against it (sizes, image counts, presets, the cost budget)
    before a job exists, so that a request it refuses is a 400 with no job behind it. (The worker checks the budget
    again when it runs a job whose model was not loaded yet.) Returns the output pixels it settled on (n x width x
    height), which the worker's batching counts."""
    entry = svc.models.get(model)
    plan = getattr(entry.pipeline, "plan", None) if entry is not None else None
    if plan is None:
        return None
    settled = await run_in_threadpool(plan, options)
    check_cost(kind, settled, svc.settings.limits)
    return settled.width * settled.height * settled.n


async def run_job(request: Request, task: Task, respond, *, stream: bool = False, partials: int = 0,
                  prefix: str = "image_generation", stream_meta: dict | None = None):
    svc = services(request)
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
        return SafeJSONResponse(job.to_json(base_url(request), svc.bus.progress(job.id)), status_code=202,
                            headers={**headers, "location": f"/v1/jobs/{task.job_id}"})
    if stream:
        return StreamingResponse(stream_job(svc, sub, task.job_id, prefix, stream_meta or {}),
                                 media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
    try:
        event = await wait_done(request, svc, sub, task.job_id)
    finally:
        svc.bus.unsubscribe(sub)
    if event is None:  # the client is gone: nobody reads an answer
        return SafeJSONResponse({}, status_code=499, headers=headers)
    if event["status"] == SUCCEEDED:
        return SafeJSONResponse(respond(event["outcome"]), headers=headers)
    return error_response(from_exception(event["outcome"]), headers=headers)


async def wait_done(request: Request, svc, sub, job_id: str):
    """The job's `done` event; None when the client disconnected first (the job is then cancelled: dropped if
    queued, stopped before its next step if running). Progress events keep coming meanwhile, so the connection is
    checked on a clock, not only when the queue is quiet."""
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(sub.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            event = None
        if event is not None and event["type"] == "done":
            return event
        if time.monotonic() - checked >= DISCONNECT_POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                await run_in_threadpool(svc.worker.cancel, job_id, "the client disconnected")
                return None


async def stream_job(svc, sub, job_id: str, prefix: str, meta: dict):
    """OpenAI's image streaming: `<prefix>.partial_image` events, then `<prefix>.completed` per image. A client
    that goes away cancels the job."""
    finished = False
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
                finished = True
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
        if not finished:
            svc.worker.cancel(job_id, "the client disconnected")


def stream_meta(req: ImageOptions) -> dict:
    return {"quality": req.quality if req.quality in ("low", "medium", "high") else "auto",
            "background": "transparent" if req.background == "transparent" else "opaque",
            "output_format": req.output_format or "png"}


@router.post("/v1/images/generations", openapi_extra=json_body(GenerationRequest))
async def generations(request: Request):
    svc = services(request)
    req = validate(GenerationRequest, await read_json(request), strict=True)
    model = svc.models.pick(req.model, "generate")
    spec, params = image_spec(req, svc.settings.limits, svc.loras)
    pixels = await precheck(svc, model, "generate", spec.options)
    params["warning"] = svc.models.get(model).warning(req.prompt, editing=False)
    task = Task(new_job_id(), "generate", model, params, pixels=pixels)
    url_base = base_url(request)
    return await run_job(request, task, lambda result: images_body(result, req, url_base), stream=bool(req.stream),
                         partials=req.partial_images or 0, prefix="image_generation", stream_meta=stream_meta(req))


async def read_upload(upload: UploadFile, label: str, limits, param: str):
    """The upload checked and decoded (off the event loop); its size is refused before it is read in full."""
    size = getattr(upload, "size", None)
    if size is not None and size > limits.max_image_bytes:
        raise bad_request(f"{label} is {human_bytes(size)}; the limit is {human_bytes(limits.max_image_bytes)}",
                          param=param, code="image_too_large")
    data = await upload.read(limits.max_image_bytes + 1)
    # decoding is CPU work; the job decodes the picture again (converted) when it runs
    return await run_in_threadpool(lambda: decode_image(data, label, limits, param, convert=False))


async def edit_task(request: Request, svc) -> tuple[Task, EditRequest]:
    """The checked edit as a job: the pictures are decoded here to check them and settle the request, and only
    their encoded bytes go with the job (decoded again when it runs), so a queued edit holds no pixels."""
    limits = svc.settings.limits
    form, scalars, files = await read_form(request, limits, ("image", "mask"))
    try:
        req = validate(EditRequest, scalars, strict=False)
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
    pixels = await precheck(svc, model, "edit", spec.options)
    params["warning"] = svc.models.get(model).warning(req.prompt, editing=True)
    return Task(new_job_id(), "edit", model, params, inputs=[d.encoded() for d in decoded], pixels=pixels), req


@router.post("/v1/images/edits", openapi_extra=form_body(EditRequest, ("image",)))
async def edits(request: Request):
    svc = services(request)
    task, req = await edit_task(request, svc)
    url_base = base_url(request)
    return await run_job(request, task, lambda result: images_body(result, req, url_base), stream=bool(req.stream),
                         partials=req.partial_images or 0, prefix="image_edit", stream_meta=stream_meta(req))


async def layers_task(request: Request, svc) -> tuple[Task, LayersRequest]:
    limits = svc.settings.limits
    form, scalars, files = await read_form(request, limits, ("image",))
    try:
        req = validate(LayersRequest, scalars, strict=False)
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
    await precheck(svc, model, "layers", runner.spec_from_params("layers", params, [upload.image]).options)
    return Task(new_job_id(), "layers", model, params, inputs=[upload.encoded()]), req


@router.post("/v1/images/layers", openapi_extra=form_body(LayersRequest, ("image",)))
async def layers(request: Request):
    """Decompose one picture into RGBA layers (bottom to top), optionally exported as PSD, ORA, PPTX or ZIP.

    Answer: OpenAI's envelope with one `data` entry per layer (PNG, `b64_json` or `url`), plus `file` (the
    exported stack: id, url, bytes) when `format` is not "json".
    """
    svc = services(request)
    task, req = await layers_task(request, svc)
    url_base = base_url(request)

    def respond(result: runner.LayersResult) -> dict:
        return {"created": int(time.time()),
                "data": [{**entry(s, req.response_format or "b64_json", url_base), "index": i}
                         for i, s in enumerate(result.layers)],
                "background": "transparent", "output_format": "png", "size": f"{result.width}x{result.height}",
                "file": result.export.to_json(url_base) if result.export else None}

    return await run_job(request, task, respond)


@router.post("/v1/images/layers/export", openapi_extra=json_body(ExportRequest))
async def export_stack(request: Request):
    """Write stored layer PNGs (file ids, bottom to top: a reordered or filtered stack) as one PSD/ORA/PPTX/ZIP."""
    from qimg.serve.store import FILE_ID

    svc = services(request)
    req = validate(ExportRequest, await read_json(request), strict=True)
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
