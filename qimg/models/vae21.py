"""Qwen-Image 2.x VAE (`AutoencoderKLQwenImage21`): 16x spatial, 64 latent channels, RGB or RGBA, single images.

Unlike v1, the checkpoint stores 2D convs (`[out, in, 3, 3]`). Each encoder level is a residual down block: its
residual blocks and stride-2 downsampler, plus a parameter-free shortcut that averages channel groups of a
space-to-depth of the block input; the decoder mirrors it with a channel-repeating depth-to-space shortcut. At levels
the reference also downsamples in time, that shortcut sees a zero frame padded before the image (so half its channel
groups average zeros), and on the way up it keeps only the last of the two frames it makes; both are reproduced here
for T=1. The `time_conv` parameters never run for one frame and are held for the checkpoint only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qimg.models.config import config_from_dict
from qimg.models.vae import (ChannelRMSNorm, Conv, ImageVAE, MidBlock, Resample, ResidualBlock, check_latent_stats,
                             finite)

LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732, 0.7562,
    -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464, -0.5236, 1.2826,
    3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076,
    1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729, -2.0595, 1.0960, -1.3260, -2.0211,
    -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304)
LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675,
    3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513, 3.9323, 3.4719,
    3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125, 3.5327, 4.7833,
    3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
    3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161)


@dataclass(frozen=True)
class VAE21Config:
    base_dim: int = 96
    decoder_base_dim: int | None = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()  # unused by the residual architecture (as in the reference)
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    is_residual: bool = True
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int | None = None
    scale_factor_temporal: int | None = 8
    scale_factor_spatial: int | None = 16

    def __post_init__(self):
        levels = len(self.dim_mult) - 1
        if len(self.temperal_downsample) != levels:
            raise ValueError(f"temperal_downsample {self.temperal_downsample} needs one entry per downsampling "
                             f"(len(dim_mult) - 1 = {levels})")
        if self.scale_factor_spatial is not None and self.scale_factor_spatial != 2**levels:
            raise ValueError(f"scale_factor_spatial {self.scale_factor_spatial} does not match dim_mult "
                             f"{self.dim_mult} ({levels} downsamplings = {2**levels}x)")
        if not self.is_residual:
            raise ValueError("only the residual architecture (is_residual=true) of the 2.x VAE is supported")
        if self.patch_size not in (None, 1):
            raise ValueError(f"patch_size {self.patch_size} is not supported (only none)")
        check_latent_stats(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VAE21Config":
        return config_from_dict(cls, data)


def space_to_depth_mean(x: torch.Tensor, cout: int, fs: int, ft: int) -> torch.Tensor:
    """Down-block shortcut: `[B, C, H, W]` -> `[B, cout, H/fs, W/fs]`, the mean of consecutive groups of the
    (C, ft, fs, fs)-ordered channels. With ft=2 the first of the two time slots is the zero frame."""
    b, c, h, w = x.shape
    x = x.view(b, c, 1, h // fs, fs, w // fs, fs).permute(0, 1, 2, 4, 6, 3, 5)  # [B, C, 1, fs, fs, h, w]
    if ft == 2:
        x = torch.cat([torch.zeros_like(x), x], dim=2)
    return x.reshape(b, cout, -1, h // fs, w // fs).mean(dim=2)


def depth_to_space_repeat(x: torch.Tensor, cout: int, fs: int, ft: int) -> torch.Tensor:
    """Up-block shortcut: repeat channels to `cout * ft * fs * fs`, unfold `(cout, ft, fs, fs)`, keep the last time
    slot and move `fs x fs` into space: `[B, C, H, W]` -> `[B, cout, H*fs, W*fs]`."""
    b, c, h, w = x.shape
    x = x.repeat_interleave(cout * ft * fs * fs // c, dim=1).view(b, cout, ft, fs, fs, h, w)[:, :, -1]
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, cout, h * fs, w * fs)


class ResidualDownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool, temporal: bool):
        super().__init__()
        self.cout, self.fs, self.ft = cout, 2 if down else 1, 2 if temporal else 1
        if cin * self.fs**2 * self.ft % cout:
            raise ValueError(f"down block {cin}->{cout}: {cin} x {self.fs**2 * self.ft} is not divisible by {cout}")
        self.resnets = nn.ModuleList(
            [ResidualBlock(cin if i == 0 else cout, cout, temporal=False) for i in range(num_res_blocks)])
        self.downsampler = None
        if down:
            self.downsampler = Resample(cout, up=False, time_conv=Conv(cout, cout, 1) if temporal else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = space_to_depth_mean(x, self.cout, self.fs, self.ft)
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
        return finite(x + shortcut)


class ResidualUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, up: bool, temporal: bool):
        super().__init__()
        self.cout, self.up, self.ft = cout, up, 2 if temporal else 1
        if up and cout * 4 * self.ft % cin:
            raise ValueError(f"up block {cin}->{cout}: {cout} x {4 * self.ft} is not divisible by {cin}")
        self.resnets = nn.ModuleList(
            [ResidualBlock(cin if i == 0 else cout, cout, temporal=False) for i in range(num_res_blocks + 1)])
        self.upsampler = None
        if up:
            time_conv = Conv(cout, 2 * cout, 1) if temporal else None
            self.upsampler = Resample(cout, up=True, out_dim=cout, time_conv=time_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = depth_to_space_repeat(x, self.cout, 2, self.ft) if self.up else None
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is None:
            return x
        return finite(self.upsampler(x) + shortcut)


class Encoder21(nn.Module):
    def __init__(self, c: VAE21Config):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        levels = len(c.temperal_downsample)
        self.conv_in = Conv(c.in_channels, dims[0])
        self.down_blocks = nn.ModuleList(
            ResidualDownBlock(cin, cout, c.num_res_blocks, down=i < levels,
                              temporal=i < levels and c.temperal_downsample[i])
            for i, (cin, cout) in enumerate(zip(dims, dims[1:])))
        self.mid_block = MidBlock(dims[-1], temporal=False)
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = Conv(dims[-1], 2 * c.z_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class Decoder21(nn.Module):
    def __init__(self, c: VAE21Config):
        super().__init__()
        base = c.decoder_base_dim or c.base_dim
        dims = [base * m for m in (c.dim_mult[-1], *reversed(c.dim_mult))]
        temporal_up = tuple(reversed(c.temperal_downsample))
        self.conv_in = Conv(c.z_dim, dims[0])
        self.mid_block = MidBlock(dims[0], temporal=False)
        self.up_blocks = nn.ModuleList(
            ResidualUpBlock(cin, cout, c.num_res_blocks, up=i < len(temporal_up),
                            temporal=i < len(temporal_up) and temporal_up[i])
            for i, (cin, cout) in enumerate(zip(dims, dims[1:])))
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = Conv(dims[-1], c.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE21(ImageVAE):
    """The 2.x VAE for single images; `in_channels` and `out_channels` are 4 (RGBA) in the official checkpoint."""

    def __init__(self, config: VAE21Config):
        super().__init__()
        self.config = config
        self.scale_factor = 2 ** len(config.temperal_downsample)
        self.image_channels = config.in_channels
        self.encoder = Encoder21(config)
        self.quant_conv = Conv(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = Conv(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder21(config)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))[:, : self.z_dim]  # posterior mean; logvar is the other half

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))
