"""The one sampling loop: flow-matching Euler over a sigma schedule, with optional true CFG.

The loop knows nothing about model families: it gets `velocity(x, sigma) -> v` callables.
"""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, renorm: bool = False) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)`; with `renorm`, rescaled per token to the conditional prediction's norm."""
    out = uncond + scale * (cond - uncond)
    if renorm:
        out = out * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))
    return out


def euler(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, *, uncond: Velocity | None = None,
          cfg: float = 1.0, renorm: bool = False, progress: Progress | None = None,
          should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Integrate from `sigmas[0]` to `sigmas[-1]` with Euler steps; the update is done in float32.

    Each step's model sigma is `(sigma * 1000) / 1000`, rounded as the reference rounds the timestep it feeds its model.
    `progress(step, total, x, denoised)` is called after every step with the new sample and the step's estimate of
    the clean sample (`x - sigma * v`, what a preview should show); `should_stop()` lets a caller cancel between steps.
    """
    total = len(sigmas) - 1
    for i in range(total):
        if should_stop is not None and should_stop():
            raise InterruptedError(f"cancelled after {i} of {total} steps")
        sigma = (sigmas[i] * 1000).expand(x.shape[0]).to(x.dtype) / 1000
        v = velocity(x, sigma)
        if uncond is not None:
            v = cfg_combine(v, uncond(x, sigma), cfg, renorm)
        if progress is not None:
            denoised = (x.float() - sigmas[i] * v.float()).to(v.dtype)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
        if progress is not None:
            progress(i + 1, total, x, denoised)
    return x
