"""Helpers for building the reference (diffusers) side of parity tests. Test-only code."""

import torch


def perturb(module: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> None:
    """Add small noise to every parameter so zero-initialised weights do not make paths trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
