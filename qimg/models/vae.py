"""Qwen-Image v1 VAE (`AutoencoderKLQwenImage`, Wan-2.1 style, 8x spatial, 16 channels) for single images, and the
building blocks it shares with the 2.x VAE (`vae21.py`).

The reference is a causal video VAE. For one frame (T=1) a causal 3D conv with k_t=3 sees the time window [0, 0, x],
so only its last temporal tap contributes: every conv here is a 2D conv with `weight[:, :, -1]`, while parameters keep
their 5-D checkpoint shapes. The temporal convs (`time_conv`) are skipped on the first frame, so they never run; they
exist only so checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qimg.errors import InputError
from qimg.models.config import config_from_dict
from qimg.models.layers import fp16_range
from qimg.models.tiling import resolve_tile, tiled

LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ---------------------------------------------------------------------------------------------------------------------
# Shared building blocks (also used by vae21.py)


def finite(x: torch.Tensor) -> torch.Tensor:
    """`x`, clamped to +-65504 when float16: a conv or sum that overflows stays finite, so no later inf - inf or
    inf * 0 turns the picture into NaN (black)."""
    return fp16_range(x, x.dtype)


class Conv(nn.Module):
    """Same-padded 2D conv. With `kt` the weight is `[out, in, kt, k, k]` (a causal 3D conv; for one frame only the
    last temporal tap sees data), without it a plain `[out, in, k, k]`."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, kt: int | None = None, stride: int = 1):
        super().__init__()
        shape = (cout, cin, k, k) if kt is None else (cout, cin, kt, k, k)
        bound = (cin * k * k) ** -0.5  # torch's default conv init
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(cout).uniform_(-bound, bound))
        self.stride, self.padding = stride, k // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.ndim == 4 else self.weight[:, :, -1]
        return finite(F.conv2d(x, weight, self.bias, self.stride, self.padding))


class ChannelRMSNorm(nn.Module):
    """`normalize(x over channels) * sqrt(C) * gamma`; gamma keeps the checkpoint's shape `[C, 1, 1(, 1)]`."""

    def __init__(self, dim: int, gamma_ndim: int = 4):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim,) + (1,) * (gamma_ndim - 1)))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        xf = x.float() if low else x
        # F.normalize(x, dim=1), with the sum of squares over channels as a product with ones: a strided reduction
        # over the channels of an NCHW tensor is several times slower on CPUs (2.9 -> 0.3 ms at 64x128x128)
        squares = (xf * xf).flatten(2)
        norm = torch.matmul(xf.new_ones(1, x.shape[1]), squares).sqrt().clamp_min(1e-12)
        normed = (xf / norm.view(x.shape[0], 1, *x.shape[2:])).to(x.dtype)
        return normed * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    """`conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`; 1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, temporal: bool):
        super().__init__()
        kt = 3 if temporal else None
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = Conv(cin, cout, kt=kt)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = Conv(cout, cout, kt=kt)
        self.conv_shortcut = Conv(cin, cout, 1, kt=1 if temporal else None) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return finite(self.conv2(F.silu(self.norm2(h))) + self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions (channels are the head dim), plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, gamma_ndim=3)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = finite(self.to_qkv(self.norm(x)))
        qkv = qkv.reshape(b, 1, 3 * c, h * w).transpose(2, 3).contiguous()  # [B, 1, HW, 3C]
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # [B, 1, HW, C]
        return finite(self.proj(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)) + x)


class Upsample2x(nn.Module):
    """Nearest-exact 2x upsampling, computed in float32 like the reference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """2x down (pad right/bottom by one, 3x3 conv stride 2) or 2x up (nearest-exact, 3x3 conv to `out_dim`).

    `time_conv` (the temporal half of the reference's "3d" modes) is held for the checkpoint only: for a single frame
    the reference skips it."""

    def __init__(self, dim: int, up: bool, out_dim: int | None = None, time_conv: nn.Module | None = None):
        super().__init__()
        if up:
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if time_conv is not None:
            self.time_conv = time_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finite(self.resample(x))


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, temporal), ResidualBlock(dim, dim, temporal)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class ImageVAE(nn.Module):
    """What both VAEs share: input checks, optional tiling, latent normalisation.

    Subclasses set `config` (with `z_dim`, `latents_mean`, `latents_std`), `scale_factor`, `image_channels`, and
    implement `_encode` (images -> posterior mean) and `_decode` (latents -> unclamped images)."""

    scale_factor: int
    image_channels: int
    run_tiles = None  # how tiles are computed: here, one after another (None), or shared by a parallel run's ranks

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    def _check(self, x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"{type(self).__name__}: {what} must be [B, {channels}, H, W], got {list(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise InputError(f"{type(self).__name__}: {what} height and width must be multiples of {multiple}, "
                             f"got {x.shape[2]}x{x.shape[3]}")

    def encode(self, images: torch.Tensor, tile=None) -> torch.Tensor:
        """Images `[B, C, H, W]` in [-1, 1] -> posterior mean latents `[B, z, H/f, W/f]` (not normalised).

        `tile`: None/False (whole image), True/"auto" (default tiles, only if larger), `size` or `(size, overlap)`
        in pixels."""
        self._check(images, self.image_channels, self.scale_factor, "images")
        spec = resolve_tile(tile, self.scale_factor)
        if spec is None:
            return self._encode(images)
        return tiled(self._encode, images, *spec, scale_in=self.scale_factor, scale_out=1, run_tiles=self.run_tiles)

    def decode(self, latents: torch.Tensor, tile=None) -> torch.Tensor:
        """Latents `[B, z, h, w]` (not normalised) -> images `[B, C, h*f, w*f]` in [-1, 1]; `tile` as in `encode`."""
        self._check(latents, self.z_dim, 1, "latents")
        spec = resolve_tile(tile, self.scale_factor)
        if spec is None:
            out = self._decode(latents)
        else:
            out = tiled(self._decode, latents, *spec, scale_in=1, scale_out=self.scale_factor,
                        run_tiles=self.run_tiles)
        return out.clamp(-1.0, 1.0)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the diffusion model's latent space: `(z - mean) / std` per channel."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: `z * std + mean`."""
        mean, std = self._stats(z)
        return z * std + mean


def check_latent_stats(config) -> None:
    for name in ("latents_mean", "latents_std"):
        if len(getattr(config, name)) != config.z_dim:
            raise ValueError(f"{name} has {len(getattr(config, name))} values, z_dim is {config.z_dim}")


# ---------------------------------------------------------------------------------------------------------------------
# v1 VAE


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample {self.temperal_downsample} needs one entry per downsampling "
                             f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1})")
        check_latent_stats(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VAEConfig":
        return config_from_dict(cls, data)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        self.conv_in = Conv(c.input_channels, dims[0], kt=3)
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims, dims[1:])):
            for _ in range(c.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, temporal=True))
                if scale in c.attn_scales:
                    blocks.append(AttentionBlock(cout))
                cin = cout
            if i < len(c.temperal_downsample):
                time_conv = Conv(cout, cout, 1, kt=3) if c.temperal_downsample[i] else None
                blocks.append(Resample(cout, up=False, time_conv=time_conv))
                scale /= 2.0
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], temporal=True)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = Conv(dims[-1], 2 * c.z_dim, kt=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nn.Module):
    """`num_res_blocks + 1` residual blocks, then an optional upsampler that halves the width."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, up: bool, temporal_up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(cin if i == 0 else cout, cout, temporal=True) for i in range(num_res_blocks + 1)])
        if up:
            time_conv = Conv(cout, 2 * cout, 1, kt=3) if temporal_up else None
            self.upsamplers = nn.ModuleList([Resample(cout, up=True, out_dim=cout // 2, time_conv=time_conv)])
        else:
            self.upsamplers = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (c.dim_mult[-1], *reversed(c.dim_mult))]
        temporal_up = tuple(reversed(c.temperal_downsample))
        self.conv_in = Conv(c.z_dim, dims[0], kt=3)
        self.mid_block = MidBlock(dims[0], temporal=True)
        self.up_blocks = nn.ModuleList()
        for i, (cin, cout) in enumerate(zip(dims, dims[1:])):
            up = i < len(temporal_up)
            # after the first block, the input is the previous upsampler's output: half its width
            self.up_blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, c.num_res_blocks, up,
                                          up and temporal_up[i]))
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = Conv(dims[-1], c.input_channels, kt=3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(ImageVAE):
    """The v1 VAE for single images (RGB, or RGBA for Layered with `input_channels=4`)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scale_factor = 2 ** len(config.temperal_downsample)
        self.image_channels = config.input_channels
        self.encoder = Encoder(config)
        self.quant_conv = Conv(2 * config.z_dim, 2 * config.z_dim, 1, kt=1)
        self.post_quant_conv = Conv(config.z_dim, config.z_dim, 1, kt=1)
        self.decoder = Decoder(config)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))[:, : self.z_dim]  # posterior mean; logvar is the other half

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))
