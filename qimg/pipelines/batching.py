"""Several requests denoised as one batch (what a server does with compatible queued jobs).

Each request is planned, encoded, noised from its own seed and decoded on its own, exactly as when it runs alone;
only the transformer's calls are shared: the requests' tokens are concatenated and each guidance branch sees the
requests' conditions stacked (a family supplies `batchable(plan)` and `velocity_batch`). Requests batch when their
plans share what the denoising loop depends on (`batch_key`: size, schedule, sampler, guidance); the others run one
by one.
"""

from __future__ import annotations

import torch
from PIL import Image

from qimg.errors import Cancelled
from qimg.pipelines.base import ProgressEvent
from qimg.sampling.guidance import guided
from qimg.sampling.samplers import SAMPLERS


def batch_key(plan) -> tuple | None:
    """What plans must share to be denoised together; None for a plan that runs alone (a block hook watches its
    own run; a family without `velocity_batch` cannot stack conditions)."""
    if plan.options.block_hook is not None or plan.options.cache:  # a hook or a cache watches its own run
        return None
    schedule = (plan.steps, plan.grid, repr(plan.scheduler), plan.options.sampler, plan.cfg, plan.cfg_normalize,
                plan.guided)
    return (plan.width, plan.height, schedule, tuple(sorted((k, repr(v)) for k, v in plan.extra.items()
                                                            if k not in ("background",))))


def run_batch(pipe, plans: list) -> list[list[Image.Image] | BaseException]:
    """The pictures of each plan (or the exception that ended it: a request cancelled mid-way is left out, the
    others go on; the batch stops when every request is cancelled)."""
    if len(plans) == 1 or not (getattr(pipe, "batchable", None) and all(pipe.batchable(p) for p in plans)):
        return [_alone(pipe, plan) for plan in plans]
    keys = {batch_key(plan) for plan in plans}
    if None in keys or len(keys) != 1:
        raise ValueError("these plans cannot share a batch: their sizes, schedules or guidance differ")
    device = pipe.info.device
    for plan in plans:
        plan.report(ProgressEvent("encode", 0, 1, plan.clock()))
    pipe.placement.use(pipe.conditioner.encoder)
    with pipe.sharing_texts():  # the negative prompt most requests share is encoded once
        conds = [pipe.encode(plan) for plan in plans]
    for plan in plans:
        plan.report(ProgressEvent("encode", 1, 1, plan.clock()))
    xs = [pipe.start_tokens(plan) for plan in plans]
    rows = [0]
    for x in xs:
        rows.append(rows[-1] + x.shape[0])
    lead = plans[0]
    schedule = pipe.schedule(lead, conds[0], xs[0])
    pipe.placement.use(pipe.transformer)
    extras = [c.extra for c in conds]
    branches = [pipe.velocity_batch(plans, [c.positive for c in conds], extras)]
    if lead.guided:
        branches.append(pipe.velocity_batch(plans, [c.negative for c in conds], extras))
    velocity = guided(branches[0], branches[1] if len(branches) > 1 else None, lead.cfg, lead.cfg_normalize)

    def model(x, sigma):
        return velocity(x, (sigma * 1000).expand(x.shape[0]).to(x.dtype) / 1000)

    stopped: dict[int, Cancelled] = {}
    total = len(schedule) - 1

    def check(step: int) -> None:
        for j, plan in enumerate(plans):
            if j not in stopped and plan.cancelled():
                stopped[j] = Cancelled(f"cancelled after {step} of {total} steps")
        if len(stopped) == len(plans):
            raise Cancelled(f"every request of the batch was cancelled after {step} of {total} steps")

    def callback(step, total, x, denoised):
        for j, plan in enumerate(plans):
            if j in stopped:
                continue
            part = slice(rows[j], rows[j + 1])
            plan.report(ProgressEvent("denoise", step, total, plan.clock(), x[part],
                                      preview=lambda plan=plan, part=part: pipe.preview(plan, denoised[part])))
        if step < total:
            check(step)

    check(0)
    x = SAMPLERS[lead.options.sampler](model, torch.cat(xs), torch.from_numpy(schedule).to(device), callback)
    outcomes: list = []
    for j, plan in enumerate(plans):
        if j in stopped:
            outcomes.append(stopped[j])
            continue
        outcomes.append(pipe.pictures(plan, conds[j], x[rows[j]:rows[j + 1]], schedule, batch=len(plans)))
    return outcomes


def _alone(pipe, plan) -> list[Image.Image] | BaseException:
    try:
        return pipe.run(plan)
    except Exception as err:  # noqa: BLE001 - this request's failure, reported to its caller
        return err
