"""Guidance as a wrapper around the velocity: a sampler sees one `model(x, sigma)` whatever the guidance."""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, renorm: bool = False) -> torch.Tensor:
    """`uncond + scale * (cond - uncond)`; with `renorm`, rescaled per token to the conditional prediction's norm."""
    out = uncond + scale * (cond - uncond)
    if renorm:
        out = out * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))
    return out


def guided(cond: Velocity, uncond: Velocity | None, scale: float, renorm: bool = False) -> Velocity:
    """True classifier-free guidance: both branches at every call, combined (`uncond` None: `cond` alone)."""
    if uncond is None:
        return cond
    return lambda x, sigma: cfg_combine(cond(x, sigma), uncond(x, sigma), scale, renorm)
