"""The cost budget of one job, in megapixel-steps: denoising steps x output megapixels x pictures x the frames the
transformer carries (the output and each condition image; Layered: the composite, every layer and the input), twice
with Layered's `recurse`. One 1024x1024 picture at 50 steps costs 52; the default limit (1000) takes a 2048x2048
edit with three condition images at 50 steps (838) and refuses 1000 steps at 1024x1024 (1049)."""

from __future__ import annotations

from qimg.serve.errors import ApiError


def job_cost(kind: str, plan) -> tuple[float, str]:
    """(megapixel-steps, how the figure is made) for a settled plan."""
    megapixels = plan.width * plan.height / 1e6
    if kind == "layers":
        layers = int(plan.extra.get("layers", 1))
        passes = 2 if getattr(plan.options, "recurse", None) is not None else 1
        frames = layers + 2
        cost = plan.steps * megapixels * frames * passes
        how = (f"{plan.steps} steps x {megapixels:.3f} Mpx ({plan.width}x{plan.height}) x {frames} frames "
               f"({layers} layers, the composite and the input)" + (" x 2 passes (recurse)" if passes > 1 else ""))
        return cost, how
    frames = 1 + len(plan.images)
    cost = plan.steps * megapixels * plan.n * frames
    how = (f"{plan.steps} steps x {megapixels:.3f} Mpx ({plan.width}x{plan.height}) x n {plan.n} x {frames} frames "
           f"(the output and {len(plan.images)} condition images)")
    return cost, how


def check_cost(kind: str, plan, limits) -> None:
    if limits.max_job_cost is None:
        return
    cost, how = job_cost(kind, plan)
    if cost > limits.max_job_cost:
        raise ApiError(400, f"this job would cost {cost:,.0f} megapixel-steps ({how}); this server's limit is "
                            f"{limits.max_job_cost:,.0f} per job (--max-job-cost): ask for fewer steps, a smaller "
                            f"size or fewer pictures", code="job_too_expensive")
