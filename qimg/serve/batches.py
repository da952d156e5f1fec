"""Which queued jobs may share one denoising batch: generations and edits for the same model with the same size,
schedule, sampler, guidance and LoRAs (from their recorded parameters), up to `Settings.max_batch` jobs and
`Settings.batch_megapixels` of output. The pipeline settles each job and batches only those whose plans agree
(`qimg.pipelines.batching`); each job still gets the pictures it would get alone."""

from __future__ import annotations

import json

BATCH_KINDS = ("generate", "edit")
SHARED = ("width", "height", "resolution", "steps", "sigmas", "scheduler", "shift", "preset", "sampler", "cfg",
          "cfg_normalize", "use_kv_cache", "images", "loras")
UNKNOWN_SIZE = 1024 * 1024  # output pixels assumed for a job whose size is the model's default


def batch_key(task) -> str | None:
    if task.kind not in BATCH_KINDS:
        return None
    params = task.params
    return json.dumps([task.model, task.kind, *[params.get(name) for name in SHARED]], sort_keys=True, default=str)


def output_pixels(task) -> int:
    if task.pixels:
        return task.pixels
    params = task.params
    width, height = params.get("width"), params.get("height")
    each = width * height if width and height else UNKNOWN_SIZE
    return each * int(params.get("n") or 1)


def companions(first, pending: dict, settings) -> list:
    """The queued tasks (in arrival order) that may join `first`'s batch; removed from `pending`."""
    key = batch_key(first)
    if key is None or settings.max_batch <= 1:
        return []
    budget = settings.batch_megapixels * 1e6 - output_pixels(first)
    chosen = []
    for job_id, task in list(pending.items()):
        if len(chosen) + 1 >= settings.max_batch:
            break
        if batch_key(task) != key or output_pixels(task) > budget:
            continue
        budget -= output_pixels(task)
        chosen.append(pending.pop(job_id))
    return chosen
