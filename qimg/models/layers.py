"""Layers shared by every model family: norms, timestep embedding, rotary embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qimg.models.fused import linears

FP16_MAX = 65504.0
FP16_ROW_MAX = 1024.0  # larger float16 matmul input rows are scaled down to this: products with sane weights fit


def fp16_range(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as `dtype`; for float16 clamped to its range first, so an overflow becomes +-65504, not inf."""
    if dtype != torch.float16:
        return x.to(dtype)
    return x.clamp(-FP16_MAX, FP16_MAX).to(dtype)


def wide_linears(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` (layers of one dtype). Float16 layers return float32: each row of `x` is
    divided by the power of two (exact) that brings it within +-FP16_ROW_MAX, multiplied in float16 and scaled back,
    so neither a large input nor its product overflows. Rows already within it are not scaled (no bias rounding)."""
    if layer_dtype(layers[0]) != torch.float16:
        return linears(layers, x)
    row_max = x.detach().abs().amax(-1, keepdim=True).float()
    scale = torch.exp2(torch.log2(row_max / FP16_ROW_MAX).ceil()).clamp(min=1.0)
    x16 = (x / scale).to(torch.float16)
    return [_unscaled(layer, y, scale) for layer, y in zip(layers, linears(layers, x16))]


def wide_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return wide_linears((layer,), x)[0]


def _unscaled(layer: nn.Module, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = y.float().clamp(-FP16_MAX, FP16_MAX)  # a product that still overflowed: +-65504, never inf * 0
    bias = getattr(layer, "bias", None)
    return y * scale if bias is None else y * scale - bias.float() * (scale - 1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned scale; statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def timestep_embedding(sigma: torch.Tensor, dim: int = 256, factor: float = 1000.0, max_period: float = 10000.0,
                       scale_last: bool = False):
    """Sinusoidal embedding of sigma in [0, 1], cosine half first, float32: `[B] -> [B, dim]`.

    The argument is `(factor * sigma) * freq`, or `factor * (sigma * freq)` with `scale_last` (the rounding order of
    diffusers' `Timesteps(scale=factor)`, used by Qwen-Image v1).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    if scale_last:
        args = factor * (sigma.float()[:, None] * freqs[None])
    else:
        args = (factor * sigma.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """`linear_2(silu(linear_1(x)))`, the diffusers `TimestepEmbedding` layout."""

    def __init__(self, in_dim: int, dim: int, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def rope_frequencies(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """Rotary table for integer positions `[S, n_axes]` -> complex64 `[S, sum(axes_dims) // 2]`.

    Axis i uses `axes_dims[i] // 2` frequencies `theta ** (-2k / dim)`; pairs are interleaved (2k, 2k+1) in the head.
    """
    parts = []
    for axis, dim in enumerate(axes_dims):
        inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32).div(dim))
        angles = positions[:, axis].float()[:, None] * inv[None].to(positions.device)
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1)


def rope_table(freqs: torch.Tensor, real: bool) -> torch.Tensor:
    """The complex RoPE table, or (`real`) its (cos, sin) pairs `[..., D/2, 2]` for code that cannot compute with
    complex numbers (compiled blocks)."""
    return torch.view_as_real(freqs) if real and freqs.is_complex() else freqs


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` `[B, S, H, D]` by complex `freqs` `[S, D/2]` (or `[B, S, D/2]`: each
    sample's own positions), in float32; `freqs` may also be `rope_table(..., real=True)`."""
    if not freqs.is_complex():
        table = freqs[:, None] if freqs.dim() == 3 else freqs[:, :, None]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        cos, sin = table[..., 0], table[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)
    table = freqs[:, None, :] if freqs.dim() == 2 else freqs[:, :, None, :]
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * table
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def layer_dtype(layer: nn.Module) -> torch.dtype:
    """A Linear layer's compute dtype, also for one whose weight is kept quantised (`qimg.lowbit.layers`)."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def layer_device(layer: nn.Module) -> torch.device:
    weight = getattr(layer, "blocks", None)
    return (weight if weight is not None else layer.weight).device
