"""Jobs, stored files, models, health and the web page."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import qimg
from qimg.serve.api_images import JOB_HEADER, base_url, next_event, services, sse
from qimg.serve.errors import ApiError, SafeJSONResponse, bad_request
from qimg.serve.store import CANCELLED, FILE_ID, JOB_ID

router = APIRouter()
STATIC = Path(__file__).parent / "static"


def job_json(svc, job, url_base: str) -> dict:
    return job.to_json(url_base, svc.bus.progress(job.id))


def get_job(svc, job_id: str):
    if not JOB_ID.fullmatch(job_id or ""):
        raise bad_request(f"invalid job id {job_id!r}: job ids look like 'job_' and 32 hex digits", param="job_id")
    job = svc.store.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return job


@router.get("/health")
async def health(request: Request):
    svc = services(request)
    runs_jobs = svc.settings.run_jobs and svc.worker.dispatch is None
    return {"status": "ok", "version": qimg.__version__,
            "models": {e.name: e.state if runs_jobs else "in the workers" for e in svc.models.entries()},
            "queue": svc.worker.state(), "auth": bool(svc.settings.api_keys),
            "jobs_run_by": "this process" if runs_jobs else "workers on the shared store"}


@router.get("/v1/loras")
async def list_loras(request: Request):
    """The LoRAs requests may name (`--lora-dir`), with their format, family, ranks and size."""
    svc = services(request)
    return {"object": "list", "data": await run_in_threadpool(svc.loras.describe)}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [e.to_json() for e in services(request).models.entries()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request):
    entry = services(request).models.get(name)
    if entry is None:
        raise ApiError(404, f"model {name!r} is not served here", param="model", code="model_not_found")
    return entry.to_json()


@router.get("/v1/jobs")
async def list_jobs(request: Request, limit: int = Query(50, ge=1, le=200), before: str | None = None):
    svc = services(request)
    if before is not None and not JOB_ID.fullmatch(before):
        raise bad_request(f"invalid job id {before!r} in 'before'", param="before")
    jobs = svc.store.list(limit + 1, before)
    url_base = base_url(request)
    return {"object": "list", "data": [job_json(svc, j, url_base) for j in jobs[:limit]],
            "has_more": len(jobs) > limit}


@router.get("/v1/jobs/{job_id}")
async def read_job(job_id: str, request: Request):
    svc = services(request)
    return job_json(svc, get_job(svc, job_id), base_url(request))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request):
    """Cancel: a queued job is dropped at once; a running one stops before its next step (status 202 then)."""
    svc = services(request)
    job = get_job(svc, job_id)
    if job.terminal:
        raise ApiError(409, f"job {job_id} is already {job.status}", code="job_finished",
                       headers={JOB_HEADER: job_id})
    outcome = svc.worker.cancel(job_id)
    job = svc.store.get(job_id)
    body = {**job_json(svc, job, base_url(request)), "cancel": outcome}
    return SafeJSONResponse(body, status_code=200 if outcome == CANCELLED else 202, headers={JOB_HEADER: job_id})


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request):
    """Server-sent events: `status` (the job), `progress` (stage, step, total, eta, elapsed, preview: a base64 PNG
    thumbnail at most every `preview_interval` seconds) and a final `done` (the job), then the stream ends."""
    svc = services(request)
    get_job(svc, job_id)
    sub = svc.bus.subscribe(job_id, previews=True)
    url_base = base_url(request)

    async def events():
        try:
            job = svc.store.get(job_id)
            yield sse("status", {"type": "status", "job": job_json(svc, job, url_base)})
            if job.terminal:
                yield sse("done", {"type": "done", "job": job_json(svc, job, url_base)})
                return
            while True:
                event = await next_event(sub)
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                if event["type"] == "progress":
                    yield sse("progress", event)
                elif event["type"] == "status":
                    yield sse("status", {"type": "status", "job": job_json(svc, svc.store.get(job_id), url_base)})
                elif event["type"] == "done":
                    yield sse("done", {"type": "done", "job": job_json(svc, svc.store.get(job_id), url_base)})
                    return
        finally:
            svc.bus.unsubscribe(sub)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no", JOB_HEADER: job_id})


RANGE = re.compile(r"^bytes=(\d{1,15})?-(\d{1,15})?$")


def check_range(header: str | None, size: int) -> None:
    """One byte range (`bytes=START-END`, `bytes=START-`, `bytes=-SUFFIX`) that the file can satisfy, else an error
    in OpenAI's shape (400, or 416 with the file's size) instead of the file server's plain-text answer."""
    if header is None:
        return
    match = RANGE.match(header.strip())
    if not match or match.groups() == (None, None):
        raise bad_request(f"Range must be one byte range such as 'bytes=0-1023', got {header[:100]!r}",
                          param="range", code="invalid_range")
    start, end = (None if g is None else int(g) for g in match.groups())
    if start is not None and end is not None and end < start:
        raise bad_request(f"Range {header!r} ends before it starts", param="range", code="invalid_range")
    if (start is not None and start >= size) or (start is None and end == 0):
        raise ApiError(416, f"Range {header!r} is outside the file ({size:,} bytes)", param="range",
                       code="range_not_satisfiable", headers={"content-range": f"bytes */{size}"})


@router.get("/v1/files/{file_id}")
async def read_file(file_id: str, request: Request, download: bool = False):
    """A stored file by its server-generated id (`file_` + 32 hex digits; a known extension may follow)."""
    svc = services(request)
    stem = file_id.rsplit(".", 1)[0] if "." in file_id else file_id
    if not FILE_ID.fullmatch(stem):
        raise bad_request("invalid file id: file ids look like 'file_' and 32 hex digits", param="file_id",
                          code="invalid_file_id")
    found = svc.files.path(stem)
    if found is None:
        raise ApiError(404, f"no file {stem!r}", param="file_id", code="file_not_found")
    record, path = found
    check_range(request.headers.get("range"), path.stat().st_size)
    filename = f"qimg-{record.id}{path.suffix}"
    return FileResponse(path, media_type=record.mime, filename=filename,
                        content_disposition_type="attachment" if download else "inline",
                        headers={"cache-control": "private, max-age=31536000, immutable"})


@router.head("/v1/files/{file_id}")
async def file_headers(file_id: str, request: Request, download: bool = False):
    """The headers `GET /v1/files/{file_id}` would send (type, length, name), without the bytes."""
    return await read_file(file_id, request, download)


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"cache-control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")
