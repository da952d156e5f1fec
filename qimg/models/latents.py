"""Latent grids <-> token sequences: how each family lays its latents out for the transformer."""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """`[B, C, h, w]` -> `[B, (h/p)*(w/p), C*p*p]` tokens, row-major over the patch grid; a token's features are
    ordered (channel, dy, dx). Patch 1 (2.x) is one token per latent cell; v1 packs 2x2 patches."""
    if patch == 1:
        return latents.flatten(2).transpose(1, 2)
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent grid {h}x{w} is not divisible by the patch size {patch}")
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, h: int, w: int, patch: int = 1) -> torch.Tensor:
    """Inverse of `pack`: tokens -> `[B, C, h, w]` (h, w: the latent grid, not the patch grid)."""
    if patch == 1:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
    b, _, features = tokens.shape
    x = tokens.reshape(b, h // patch, w // patch, features // patch**2, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, features // patch**2, h, w)
