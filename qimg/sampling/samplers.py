"""Samplers over a flow-matching sigma schedule, in the style of k-diffusion: each is a small pure function
`sampler(model, x, sigmas, callback=None) -> x`.

`model(x, sigma) -> v` is the velocity at a scalar `sigma` (a 0-d tensor): guidance, caches and the model's own
timestep convention are already wrapped around it, so a sampler knows nothing of them. `x` at `sigma` is
`(1 - sigma) * x0 + sigma * noise` and `x0 = x - sigma * v`. `callback(step, total, x, denoised)` is called after
every step with the new sample and that step's estimate of the clean sample (what a preview shows); a callback
may raise to stop. Updates are computed in float32 and stored in the model's dtype.

Adding a sampler is one function here and one entry in SAMPLERS.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # torch is not imported here, so that the CLI can list the samplers without loading it
    import torch

Model = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
Callback = Callable[[int, int, "torch.Tensor", "torch.Tensor"], None]


def euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """First-order steps along the velocity: `x += (sigma_next - sigma) * v` (the reference's scheduler)."""
    total = len(sigmas) - 1
    for i in range(total):
        v = model(x, sigmas[i])
        if callback is not None:
            denoised = (x.float() - sigmas[i] * v.float()).to(v.dtype)
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(v.dtype)
        if callback is not None:
            callback(i + 1, total, x, denoised)
    return x


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; -inf at sigma 1 (pure noise)."""
    return -math.inf if sigma >= 1 else math.log((1 - sigma) / sigma)


def dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) with alpha = 1 - sigma: a multistep second-order data-prediction solver,
    one model call per step. The first step, and the last (to sigma 0), are first order; so is a step after one
    that started from sigma 1, where the log-SNR step is infinite and the correction vanishes. A first-order step
    of this solver is exactly an Euler step."""
    total = len(sigmas) - 1
    previous, h_previous = None, None
    for i in range(total):
        s, t = float(sigmas[i]), float(sigmas[i + 1])
        v = model(x, sigmas[i])
        denoised = x.float() - sigmas[i] * v.float()
        if t <= 0:
            out = denoised
        else:
            h = _log_snr(t) - _log_snr(s)
            estimate = denoised
            if previous is not None and 0 < h and 0 < h_previous < math.inf:
                half_over_r = h / (2 * h_previous)
                estimate = (1 + half_over_r) * denoised - half_over_r * previous
            out = (t / s) * x.float() + (1 - t) * -math.expm1(-h) * estimate
            h_previous = h
        previous = denoised
        x = out.to(v.dtype)
        if callback is not None:
            callback(i + 1, total, x, denoised.to(v.dtype))
    return x


SAMPLERS: dict[str, Callable[..., "torch.Tensor"]] = {"euler": euler, "dpmpp-2m": dpmpp_2m}
