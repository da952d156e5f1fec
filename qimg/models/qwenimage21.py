"""Qwen-Image 2.x transformer: single stream, block-causal attention, shared modulation, prefix KV cache.

The joint sequence is the condition encoder's token sequence with each condition image's latent tokens substituted at
its `<|image_pad|>` slots (one slot = a 2x2 group of latent tokens), followed by the target image's tokens. Attention
is block-causal: token q may see token k iff q >= k or both lie in the same image block. So the prefix (text and
condition images) never sees the target; with `causal_condition` it is also modulated at t=0, which makes its keys
and values the same at every denoising step: `encode_prefix` computes them once and `denoise` reuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qimg.models.config import config_from_dict
from qimg.models.attention import UsesAttention
from qimg.models.hooks import BlockHook, run_blocks
from qimg.models.layers import (RMSNorm, TimestepEmbedder, apply_rope, fp16_range, layer_device, layer_dtype,
                               rope_frequencies, rope_table, timestep_embedding, wide_linear, wide_linears)

TOKENS_PER_SLOT = 4  # one VLM image slot covers 2x2 latent tokens of 16 px


@dataclass(frozen=True)
class QwenImage21Config:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")
        if self.patch_size != 1:
            raise ValueError(f"Qwen-Image 2.x takes unpatched latents: patch_size must be 1, got {self.patch_size}")

    @classmethod
    def from_dict(cls, data: dict) -> "QwenImage21Config":
        return config_from_dict(cls, data)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class ZeroCentredRMSNorm(nn.Module):
    """RMS norm whose stored weight is `scale - 1`, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (self.weight.float() + 1)).to(x.dtype)


class TextProjection(nn.Module):
    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.text_norm = ZeroCentredRMSNorm(in_dim, eps)
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(self.text_norm(x)), approximate="tanh"))


class TimeEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(256, dim, bias=False)

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(sigma).to(dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)

    def fused_groups(self):
        return [(self.to_q, self.to_k, self.to_v)]

    def qkv(self, x: torch.Tensor, freqs: torch.Tensor):
        """Projected, normed and rotated `[B, S, H, Dh]` queries, keys and values."""
        q, k, v = (t.unflatten(-1, (self.heads, self.head_dim))
                   for t in wide_linears((self.to_q, self.to_k, self.to_v), x))
        v = fp16_range(v, layer_dtype(self.to_v))
        q = apply_rope(self.norm_q(q).to(v.dtype), freqs)
        k = apply_rope(self.norm_k(k).to(v.dtype), freqs)
        return q, k, v


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden, bias=False)
        self.gate_layer = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, dim, bias=False)

    def fused_groups(self):
        return [(self.gate_layer, self.proj)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = wide_linears((self.gate_layer, self.proj), x)
        return wide_linear(self.out, F.silu(gate) * up)


class Block(nn.Module):
    """One single-stream block; its scales and gates come from the model's shared modulation."""

    def __init__(self, cfg: QwenImage21Config):
        super().__init__()
        self.eps = cfg.eps
        self.attn = Attention(cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.img_mlp = SwiGLU(cfg.dim, cfg.dim * cfg.mlp_ratio)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=self.eps)

    def forward(self, x, mod, freqs, attend):
        """`mod` = (scale1, gate1, scale2, gate2), each broadcastable to x; `attend(q, k, v) -> out` does the mixing.

        In float16 the stream, modulation, MLP hidden state and residual adds are float32 (matmuls and attention
        stay float16, see `wide_linears`) and the output is clipped to +-65504 (the reference clips only there)."""
        if x.dtype != torch.float16:
            return self._forward(x, mod, freqs, attend)
        x, k, v = self._forward(x.float(), tuple(m.float() for m in mod), freqs, attend)
        return fp16_range(x, torch.float16), k, v

    def _forward(self, x, mod, freqs, attend):
        q, k, v = self.project(x, mod, freqs)
        return self.finish(x, attend(q, k, v).flatten(2, 3), mod), k, v

    def project(self, x, mod, freqs):
        """The block before attention (per token): modulated norm, q/k/v, their norms and RoPE."""
        return self.attn.qkv(self._norm(x) * (1 + mod[0]), freqs)

    def finish(self, x, out, mod):
        """The block after attention (per token): output projection, gated residuals, the MLP."""
        scale1, gate1, scale2, gate2 = mod
        x = x + gate1.tanh() * wide_linear(self.attn.to_out[0], out)
        return x + gate2.tanh() * self.img_mlp(self._norm(x) * (1 + scale2))


@dataclass
class Prefix:
    """Keys/values of the text + condition-image prefix for every layer, and what the target needs to follow it."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor | None  # [B, P] bool, None when every prefix token is valid
    target_position: int | list[int]  # RoPE frame position of the target block (a list: one per sample)
    timestep_free: bool  # True when computed at t=0 (causal_condition): reusable at every step
    groups: list[tuple[torch.Tensor, int]] | None = None  # stacked prefixes of unequal lengths: (rows, length)


def stack_prefixes(prefixes: list[Prefix]) -> Prefix:
    """Several requests' prefixes as one batch: keys and values padded at the end to the longest prefix, the
    padding masked out, and each sample's own target position. Equal prefixes stack without a mask, so a batch
    computes what each request computes alone."""
    if len(prefixes) == 1:
        return prefixes[0]
    if len({p.timestep_free for p in prefixes}) != 1:
        raise ValueError("prefixes computed at t=0 and per step cannot share a batch")
    lengths = [p.keys[0].shape[1] for p in prefixes]
    longest = max(lengths)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return t if t.shape[1] == longest else F.pad(t, (0, 0, 0, 0, 0, longest - t.shape[1]))

    keys = [torch.cat([pad(p.keys[i]) for p in prefixes]) for i in range(len(prefixes[0].keys))]
    values = [torch.cat([pad(p.values[i]) for p in prefixes]) for i in range(len(prefixes[0].values))]
    key_valid = groups = None
    rows = [n for p in prefixes for n in [p.keys[0].shape[1]] * p.keys[0].shape[0]]
    if len(set(lengths)) > 1 and all(p.key_valid is None for p in prefixes):
        # each length attends on its own rows, unpadded: the batch gives each request its own numbers
        device = prefixes[0].keys[0].device
        groups = [(torch.tensor([i for i, n in enumerate(rows) if n == length], device=device), length)
                  for length in sorted(set(lengths))]
    elif len(set(lengths)) > 1 or any(p.key_valid is not None for p in prefixes):
        masks = []
        for p, n in zip(prefixes, lengths):
            valid = p.key_valid if p.key_valid is not None else torch.ones(
                p.keys[0].shape[0], n, dtype=torch.bool, device=p.keys[0].device)
            masks.append(F.pad(valid, (0, longest - n), value=False))
        key_valid = torch.cat(masks)
    positions = [q for p in prefixes for q in ([p.target_position] * p.keys[0].shape[0]
                                                if isinstance(p.target_position, int) else p.target_position)]
    target = positions[0] if len(set(positions)) == 1 else positions
    return Prefix(keys, values, key_valid, target, prefixes[0].timestep_free, groups)


def prefix_layout(slot_mask: torch.Tensor, image_shapes: list[tuple[int, int]]):
    """Token layout of the prefix: per-token (frame, row, col) positions, image block id (-1 = text), end position.

    `slot_mask` `[S_txt]` marks the condition encoder's image slots; `image_shapes` the (h, w) latent grid of each
    condition image, in order. Text advances one position on all three axes; an image freezes the frame axis at the
    current position, lays its tokens on a centred grid, then advances the position by max(h, w).
    """
    slots = slot_mask.tolist()
    positions, block_ids = [], []
    position, cursor = 0, 0
    for block, (h, w) in enumerate(image_shapes):
        try:
            start = slots.index(True, cursor)
        except ValueError:
            raise ValueError(f"condition image {block + 1} of {len(image_shapes)} has no <|image_pad|> slots") from None
        n_slots = h * w // TOKENS_PER_SLOT
        if h * w % TOKENS_PER_SLOT or slots[start:start + n_slots] != [True] * n_slots:
            raise ValueError(f"condition image {block + 1} has a {h}x{w} latent grid that does not fill its slots")
        for _ in range(start - cursor):
            positions.append((position, position, position))
            block_ids.append(-1)
            position += 1
        positions.extend((position, r, c) for r in range(-(h - h // 2), h // 2) for c in range(-(w - w // 2), w // 2))
        block_ids.extend([block] * (h * w))
        position += max(h, w)
        cursor = start + n_slots
    if any(slots[cursor:]):
        raise ValueError(f"the prompt has image slots for more than the {len(image_shapes)} condition images given")
    for _ in range(len(slots) - cursor):
        positions.append((position, position, position))
        block_ids.append(-1)
        position += 1
    return positions, block_ids, position


def target_positions(h: int, w: int, frame: int) -> list[tuple[int, int, int]]:
    return [(frame, r, c) for r in range(-(h - h // 2), h // 2) for c in range(-(w - w // 2), w // 2)]


def segments(block_ids: list[int]) -> list[tuple[int, int, bool]]:
    """Runs of equal block id as (start, end, is_text)."""
    runs, start = [], 0
    for i in range(1, len(block_ids) + 1):
        if i == len(block_ids) or block_ids[i] != block_ids[start]:
            runs.append((start, i, block_ids[start] < 0))
            start = i
    return runs


class QwenImage21Transformer(UsesAttention, nn.Module):
    def __init__(self, cfg: QwenImage21Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.time_text_embed = TimeEmbed(dim)
        self.txt_in = TextProjection(cfg.context_in_dim, dim, cfg.eps)
        self.img_in = nn.Linear(cfg.in_channels * cfg.patch_size**2, dim, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim, bias=False))
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(dim, dim, bias=False)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * (cfg.out_channels or cfg.in_channels), bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return layer_dtype(self.img_in)

    def _temb(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.time_text_embed(sigma.to(self.dtype), self.dtype)

    def _modulation(self, temb: torch.Tensor):
        """Shared (scale1, gate1, scale2, gate2) for every block, each `[B, 1, D]`."""
        return tuple(m.unsqueeze(1) for m in self.modulation(temb).chunk(4, dim=-1))

    def _rope(self, positions) -> torch.Tensor:
        pos = torch.tensor(positions, dtype=torch.long, device=layer_device(self.img_in)).reshape(-1, 3)
        return rope_frequencies(pos, self.cfg.axes_dims_rope)

    def encode_prefix(
        self,
        text: torch.Tensor,
        slot_mask: torch.Tensor,
        cond_tokens: list[torch.Tensor] = (),
        cond_shapes: list[tuple[int, int]] = (),
        text_mask: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
    ) -> Prefix:
        """Run the prefix through every layer and keep its keys and values.

        text `[B, S_txt, context_in_dim]`: encoder states (values at image slots are ignored); slot_mask `[S_txt]`;
        cond_tokens: per condition image `[B, h*w, in_channels]` packed latents; text_mask `[B, S_txt]` bool.
        sigma: the step's sigma `[B]` when `causal_condition` is off (the prefix then depends on the step).
        """
        if self.cfg.causal_condition:
            sigma = torch.zeros(1, device=text.device)
        elif sigma is None:
            raise ValueError("a model without causal_condition needs the step's sigma to encode its prefix")
        batch = text.shape[0]
        positions, block_ids, end = prefix_layout(slot_mask, list(cond_shapes))
        prefix_slots = slot_mask.repeat_interleave(torch.where(slot_mask, TOKENS_PER_SLOT, 1))
        x = text.new_zeros(batch, prefix_slots.shape[0], self.cfg.dim)
        x[:, ~prefix_slots] = self.txt_in(text[:, ~slot_mask])
        if cond_shapes:
            x[:, prefix_slots] = self.img_in(torch.cat(list(cond_tokens), dim=1))
        key_valid = None
        if text_mask is not None and not bool(text_mask.all()):
            key_valid = torch.ones(batch, prefix_slots.shape[0], dtype=torch.bool, device=x.device)
            key_valid[:, ~prefix_slots] = text_mask.bool()[:, ~slot_mask]
        freqs = rope_table(self._rope(positions), self.compiled_blocks)
        mod = self._modulation(self._temb(sigma))
        runs = segments(block_ids)
        device = x.device

        def attend(q, k, v):
            outs = []
            for start, stop, is_text in runs:
                mask = None
                if is_text:
                    n = stop - start
                    mask = torch.ones(n, stop, dtype=torch.bool, device=device).tril(start)[None, None]
                if key_valid is not None:
                    kv = key_valid[:, None, None, :stop]
                    mask = kv if mask is None else mask & kv
                outs.append(self.attend(q[:, start:stop], k[:, :stop], v[:, :stop], mask))
            return torch.cat(outs, dim=1)

        keys, values = [], []
        for block in self.transformer_blocks:
            x, k, v = block(x, mod, freqs, attend)
            keys.append(k)
            values.append(v)
        return Prefix(keys, values, key_valid, end, timestep_free=self.cfg.causal_condition)

    def target_rope(self, prefix: Prefix, shape: tuple[int, int]) -> torch.Tensor:
        """`[S, D/2]`, or `[B, S, D/2]` for a stacked prefix whose samples start their targets at other frames."""
        if isinstance(prefix.target_position, int):
            return self._rope(target_positions(*shape, prefix.target_position))
        tables = {p: self._rope(target_positions(*shape, p)) for p in set(prefix.target_position)}
        return torch.stack([tables[p] for p in prefix.target_position])

    def denoise(self, latents: torch.Tensor, sigma: torch.Tensor, prefix: Prefix, shape: tuple[int, int],
                freqs: torch.Tensor | None = None, block_hook: BlockHook | None = None) -> torch.Tensor:
        """Velocity for the target tokens `[B, h*w, in_channels]` at `sigma` `[B]`, attending to the prefix;
        `block_hook` sees each block's call (`qimg.models.hooks`)."""
        freqs = self.target_rope(prefix, shape) if freqs is None else freqs
        if sigma.numel() > 1 and bool((sigma == sigma[:1]).all()):
            sigma = sigma[:1]  # one embedding broadcast over the batch: the same numbers at any batch size
        freqs = rope_table(self.sequence.shard(freqs, dim=-2), self.compiled_blocks)
        return self.denoise_step(latents, sigma, prefix, freqs, block_hook)

    def denoise_step(self, latents, sigma, prefix: Prefix, freqs, block_hook: BlockHook | None = None):
        """`denoise` once its arguments are settled (`freqs`: this process's RoPE table; what `compile="step"`
        compiles)."""
        temb = self._temb(sigma)
        mod = self._modulation(temb)
        mask = None
        if prefix.key_valid is not None:
            ones = prefix.key_valid.new_ones(latents.shape[0], latents.shape[1])
            mask = torch.cat([prefix.key_valid, ones], dim=1)[:, None, None, :]
        attend, sequence = self.attend, self.sequence

        def run_block(index, block, x):
            pk, pv = prefix.keys[index], prefix.values[index]
            if prefix.groups is None:
                def mix(q, k, v):
                    return sequence.attention(attend, q, k, v, mask, (None, pk, pv))[1]
            else:
                def mix(q, k, v):
                    out = torch.empty_like(q)
                    for rows, n in prefix.groups:
                        out[rows] = sequence.attention(attend, q[rows], k[rows], v[rows], None,
                                                       (None, pk[rows, :n], pv[rows, :n]))[1]
                    return out
            return block(x, mod, freqs, mix)[0]

        x = run_blocks(self.transformer_blocks, self.img_in(sequence.shard(latents)), run_block, block_hook)
        scale = self.norm_out.linear(F.silu(temb).to(x.dtype)).unsqueeze(1)
        return sequence.gather(self.proj_out(F.layer_norm(x, x.shape[-1:], eps=self.cfg.eps) * (1 + scale)))

    def forward(self, latents, text, sigma, slot_mask, cond_tokens=(), cond_shapes=(), text_mask=None,
                shape=None, block_hook: BlockHook | None = None) -> torch.Tensor:
        """One uncached step: the prefix and the target together (the prefix is recomputed)."""
        if shape is None:
            side = int(math.isqrt(latents.shape[1]))
            shape = (side, side)
        prefix = self.encode_prefix(text, slot_mask, cond_tokens, cond_shapes, text_mask,
                                    None if self.cfg.causal_condition else sigma)
        return self.denoise(latents, sigma, prefix, shape, block_hook=block_hook)
