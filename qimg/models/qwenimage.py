"""Qwen-Image v1 transformer: 60 dual-stream (MMDiT) blocks; covers Qwen-Image, 2512, Edit, Edit-2509/2511, Layered.

Text and image tokens keep separate weights (modulation, QKV, output projection, MLP) and meet in one joint attention
over [text, image]. The image sequence is the packed target latents followed by any reference/condition latents, one
entry of `image_shapes` = (frames, h, w) each. Positions (MSRoPE): image entry i sits at frame i (Layered: the last
entry, the condition image, at frame -1) on a grid centred on 0; text token j sits at P0 + j on all three axes, P0 just
past the largest image half-extent (Layered: at least the number of layer entries).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qimg.models.config import config_from_dict
from qimg.models.attention import WHOLE, UsesAttention, sdpa
from qimg.models.hooks import BlockHook, run_blocks
from qimg.models.layers import (RMSNorm, TimestepEmbedder, apply_rope, fp16_range, layer_device, layer_dtype,
                               rope_frequencies, rope_table, timestep_embedding, wide_linear, wide_linears)

EPS = 1e-6
Mix = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, v, text (q, k, v)) -> (text out, image out)


def _whole_mix(q, k, v, text):
    return WHOLE.attention(sdpa, q, k, v, None, text)


@dataclass(frozen=True)
class QwenImageConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False  # Edit-2511: reference-image tokens are modulated at t=0
    use_additional_t_cond: bool = False  # Layered: learned embedding of a 0/1 flag added to the time embedding
    use_layer3d_rope: bool = False  # Layered: the last image entry (the condition) sits at frame -1

    def __post_init__(self):
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True (a guidance-distilled variant) is not supported: no official "
                             "Qwen-Image checkpoint has a guidance embedder")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be three even numbers")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    @classmethod
    def from_dict(cls, data: dict) -> "QwenImageConfig":
        return config_from_dict(cls, data)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size**2 * (self.out_channels or self.in_channels)


class TimeTextEmbed(nn.Module):
    def __init__(self, dim: int, additional: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(256, dim, bias=True)
        if additional:
            self.addition_t_embedding = nn.Embedding(2, dim)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype, flag: torch.Tensor | None) -> torch.Tensor:
        temb = self.timestep_embedder(timestep_embedding(sigma, scale_last=True).to(dtype))
        if flag is not None:
            temb = temb + self.addition_t_embedding(flag).to(dtype)
        return temb


class JointAttention(nn.Module):
    """Image-stream (`to_*`) and text-stream (`add_*`) projections around one attention over [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.to_add_out = nn.Linear(inner, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim, EPS), RMSNorm(head_dim, EPS)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, EPS), RMSNorm(head_dim, EPS)

    def fused_groups(self):
        return [(self.to_q, self.to_k, self.to_v), (self.add_q_proj, self.add_k_proj, self.add_v_proj)]

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k, freqs):
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim)) for t in wide_linears((to_q, to_k, to_v), x))
        v = fp16_range(v, layer_dtype(to_v))
        return apply_rope(norm_q(q).to(v.dtype), freqs), apply_rope(norm_k(k).to(v.dtype), freqs), v

    def qkv(self, img, txt, img_freqs, txt_freqs):
        """(q, k, v of the image stream, q, k, v of the text stream), each `[B, S, H, Dh]`."""
        qi, ki, vi = self._qkv(img, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k, img_freqs)
        qt, kt, vt = self._qkv(txt, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                               self.norm_added_k, txt_freqs)
        return qi, ki, vi, qt, kt, vt

    def out(self, out_img, out_txt):
        # contiguous halves: the layout the reference multiplies (bits differ in bf16 otherwise)
        return (wide_linear(self.to_out[0], out_img.flatten(2, 3).contiguous()),
                wide_linear(self.to_add_out, out_txt.flatten(2, 3).contiguous()))


class GeluProj(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(wide_linear(self.proj, x), approximate="tanh")


class FeedForward(nn.Module):
    """`net.0.proj` -> GELU(tanh) -> (dropout slot, no weights) -> `net.2`."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GeluProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wide_linear(self.net[2], self.net[0](x))


def _per_group(fn, x: torch.Tensor, params, split: int | None) -> torch.Tensor:
    """`fn(x, *params[0])` on all tokens, or with `split`: tokens before it use params[0], the rest params[1]."""
    if split is None or split >= x.shape[1]:
        return fn(x, *params[0])
    if split <= 0:
        return fn(x, *params[1])
    return torch.cat([fn(x[:, :split], *params[0]), fn(x[:, split:], *params[1])], dim=1)


def _modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale) + shift


class Block(nn.Module):
    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        dim = cfg.dim
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mlp = FeedForward(dim)

    def forward(self, img, txt, temb, freqs, split=None, mix: Mix | None = None):
        """temb `[B, D]`; with `split`, `[2B, D]` whose second half (t=0) modulates the image tokens from `split` on;
        `mix(q, k, v, text_qkv) -> (text out, image out)`: the joint attention (default: sdpa, no mask).

        In float16 both streams, the modulation, MLP hidden states and residual adds are float32 (matmuls and
        attention stay float16, see `wide_linears`) and the outputs are clipped to +-65504 (the reference clips
        only there)."""
        if img.dtype != torch.float16:
            return self._forward(img, txt, temb, freqs, split, mix)
        img, txt = self._forward(img.float(), txt.float(), temb, freqs, split, mix)
        return fp16_range(img, torch.float16), fp16_range(txt, torch.float16)

    def _forward(self, img, txt, temb, freqs, split, mix):
        qkv, mods = self.project(img, txt, temb, freqs, split)
        out_txt, out_img = (mix or _whole_mix)(*qkv[:3], qkv[3:])
        return self.finish(img, txt, out_img, out_txt, mods, split)

    def project(self, img, txt, temb, freqs, split):
        """The block before attention (per token): both streams' modulation, modulated norms, q/k/v with norms
        and RoPE; -> ((q, k, v of the image, q, k, v of the text), the modulations)."""
        batch = txt.shape[0]
        img_mod = [m[:, None].chunk(6, dim=-1) for m in self.img_mod(temb).split(batch)]
        txt_mod = self.txt_mod(temb[:batch])[:, None].chunk(6, dim=-1)
        qkv = self.attn.qkv(_per_group(_modulate, img, [m[0:2] for m in img_mod], split),
                            _modulate(txt, *txt_mod[0:2]), *freqs)
        return qkv, (img_mod, txt_mod)

    def finish(self, img, txt, out_img, out_txt, mods, split):
        """The block after attention (per token): output projections, gated residuals, both MLPs."""
        img_mod, txt_mod = mods
        a_img, a_txt = self.attn.out(out_img, out_txt)
        img = img + _per_group(torch.mul, a_img, [m[2:3] for m in img_mod], split)
        txt = txt + txt_mod[2] * a_txt
        h = _per_group(_modulate, img, [m[3:5] for m in img_mod], split)
        img = img + _per_group(torch.mul, self.img_mlp(h), [m[5:6] for m in img_mod], split)
        txt = txt + txt_mod[5] * self.txt_mlp(_modulate(txt, *txt_mod[3:5]))
        return img, txt


def _centred(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) - (n - n // 2)


class QwenImageTransformer(UsesAttention, nn.Module):
    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.time_text_embed = TimeTextEmbed(dim, cfg.use_additional_t_cond)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, EPS)
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, cfg.out_dim)

    @property
    def dtype(self) -> torch.dtype:
        return layer_dtype(self.img_in)

    def positions(self, image_shapes, text_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer (frame, row, col) positions `[S_img, 3]` of all image tokens and `[text_len, 3]` of the text."""
        device = device or layer_device(self.img_in)
        shapes = [tuple(int(v) for v in s) for s in image_shapes]
        layered = self.cfg.use_layer3d_rope
        parts = []
        for i, (f, h, w) in enumerate(shapes):
            if layered and i == len(shapes) - 1:
                frames = torch.full((f,), -1, device=device)  # the condition image
            else:
                frames = torch.arange(f, device=device) + i
            grid = torch.meshgrid(frames, _centred(h, device), _centred(w, device), indexing="ij")
            parts.append(torch.stack(grid, dim=-1).reshape(-1, 3))
        start = max((max(h // 2, w // 2) for _, h, w in shapes), default=0)
        if layered:
            start = max(start, len(shapes) - 1)
        text = (torch.arange(text_len, device=device) + start)[:, None].expand(-1, 3)
        return torch.cat(parts), text

    def rope(self, image_shapes, text_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Complex RoPE tables (image `[S_img, Dh/2]`, text `[text_len, Dh/2]`); compute once per generation."""
        img, txt = self.positions(image_shapes, text_len, device)
        return rope_frequencies(img, self.cfg.axes_dims_rope), rope_frequencies(txt, self.cfg.axes_dims_rope)

    def time_embedding(self, sigma: torch.Tensor, additional_t_cond: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, D]` conditioning for sigma `[B]` (in [0, 1]); Layered adds the flag embedding (default flag 0)."""
        if self.cfg.use_additional_t_cond:
            if additional_t_cond is None:
                additional_t_cond = torch.zeros(sigma.shape[0], dtype=torch.long, device=sigma.device)
        elif additional_t_cond is not None:
            raise ValueError("additional_t_cond given but the config has use_additional_t_cond=False")
        return self.time_text_embed(sigma.to(self.dtype), self.dtype, additional_t_cond)

    def forward(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        sigma: torch.Tensor,
        image_shapes,
        text_mask: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
        freqs: tuple[torch.Tensor, torch.Tensor] | None = None,
        block_hook: BlockHook | None = None,
    ) -> torch.Tensor:
        """Velocity `[B, S_img, patch^2 * out_channels]` for every image token.

        latents `[B, S_img, in_channels]`: packed target tokens then reference/condition tokens, in `image_shapes`
        order (one (frames, h, w) latent-patch grid per entry, shared by the batch); text `[B, S_txt,
        joint_attention_dim]`; sigma `[B]`; text_mask `[B, S_txt]` (True = real token; positions ignore it);
        additional_t_cond `[B]` long (Layered); freqs: `self.rope(image_shapes, S_txt)`, to reuse across steps;
        block_hook: sees each block's call, its state `(image, text)` (`qimg.models.hooks`).
        """
        n_img = sum(prod(s) for s in image_shapes)
        if latents.shape[1] != n_img:
            raise ValueError(f"latents have {latents.shape[1]} tokens but image_shapes {list(image_shapes)} "
                             f"describe {n_img}")
        if freqs is None:
            freqs = self.rope(image_shapes, text.shape[1], latents.device)
        mask = None
        if text_mask is not None:
            ones = torch.ones(latents.shape[:2], dtype=torch.bool, device=latents.device)
            mask = torch.cat([text_mask.bool(), ones], dim=1)[:, None, None, :]

        split = None
        n_target = prod(image_shapes[0])
        if self.cfg.zero_cond_t and n_target < n_img:  # reference tokens modulated at t=0: one [2B] embedding
            split = n_target
            flag = None if additional_t_cond is None else additional_t_cond.repeat(2)
            block_temb = self.time_embedding(torch.cat([sigma, torch.zeros_like(sigma)]), flag)
            temb = block_temb[:sigma.shape[0]]
        else:
            block_temb = temb = self.time_embedding(sigma, additional_t_cond)

        attend, sequence = self.attend, self.sequence
        start, stop = sequence.span(n_img)
        if split is not None:  # where the reference tokens start within this process's tokens
            split = min(max(split - start, 0), stop - start)
        freqs = (rope_table(sequence.shard(freqs[0], dim=0), self.compiled_blocks),
                 rope_table(freqs[1], self.compiled_blocks))

        def mix(q, k, v, text):
            return sequence.attention(attend, q, k, v, mask, text)

        def run_block(index, block, state):
            return block(*state, block_temb, freqs, split, mix)

        img, txt = run_blocks(self.transformer_blocks, (self.img_in(sequence.shard(latents)),
                                                        self.txt_in(self.txt_norm(text))), run_block, block_hook)
        scale, shift = self.norm_out.linear(F.silu(temb).to(img.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return sequence.gather(self.proj_out(F.layer_norm(img, img.shape[-1:], eps=EPS) * (1 + scale) + shift))
