"""Writing K-quant blocks (Q4_K, Q5_K, Q6_K), the formats GGUF transformers are mostly published in; the `gguf`
package reads them but has no quantiser for them.

Each 256-weight super-block is cut into sub-blocks (8 x 32 for Q4_K/Q5_K, 16 x 16 for Q6_K). Q4_K/Q5_K store
`w = d * scale_s * q - dmin * min_s` with q in [0, 2^bits) and 6-bit `scale_s`, `min_s`; Q6_K stores `w = d * scale_s
* (q - 32)` with signed 8-bit `scale_s`. `d` and `dmin` are float16. Sub-block ranges come from their own min/max
(for the asymmetric formats, refined by a small search over the scale that minimises the squared error), then the
sub-block scales are quantised against the super-block's float16 `d`, and every weight is rounded against the scale
it will be decoded with. The byte layouts are those `qimg.lowbit.gguf_blocks` decodes (the ggml layouts).
"""

from __future__ import annotations

import torch

QK_K = 256
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _f16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 `[n]` -> (the float16 bytes `[n, 2]`, the float16 value back as float32 `[n, 1]`)."""
    half = values.to(torch.float16)
    return half.view(torch.uint8).reshape(-1, 2), half.float().reshape(-1, 1)


def _pack_bits(fields: torch.Tensor, width: int) -> torch.Tensor:
    """`[n, g, count, b]` fields of `width` bits -> `[n, g, b]` bytes (field j at bit `width * j`)."""
    shifts = torch.arange(fields.shape[2], dtype=torch.int32).mul_(width).view(1, 1, -1, 1)
    return (fields.to(torch.int32) << shifts).sum(dim=2).to(torch.uint8)


def _affine_ranges(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block `[n, s, k]`: the (scale, min) of `x ~ scale * q - min`, q in [0, levels], min >= 0; the
    min/max range, then the best of a few shrunk scales (rounding error, not range, decides)."""
    low = x.amin(dim=-1).clamp(max=0)
    high = x.amax(dim=-1)
    best_scale = (high - low).clamp(min=1e-12) / levels
    best_min = -low
    best_err = _affine_error(x, best_scale, best_min, levels)
    for shrink in (0.95, 0.9, 0.85, 0.8):
        for anchor in ("low", "high"):
            scale = (high - low).clamp(min=1e-12) * shrink / levels
            mn = -low if anchor == "low" else (scale * levels - high).clamp(min=0)
            err = _affine_error(x, scale, mn, levels)
            better = err < best_err
            best_scale, best_min = torch.where(better, scale, best_scale), torch.where(better, mn, best_min)
            best_err = torch.minimum(err, best_err)
    return best_scale, best_min


def _affine_error(x, scale, mn, levels) -> torch.Tensor:
    q = ((x + mn[..., None]) / scale[..., None]).round().clamp(0, levels)
    return ((q * scale[..., None] - mn[..., None] - x) ** 2).sum(dim=-1)


def _k_affine(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: -> (d, dmin and the packed 6-bit scales/mins bytes `[n, 16]`, q `[n, 8, 32]`)."""
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    levels = (1 << bits) - 1
    scale, mn = _affine_ranges(sub, levels)
    d_bytes, d = _f16(scale.amax(dim=-1) / 63)
    m_bytes, dmin = _f16(mn.amax(dim=-1) / 63)
    sc = (scale / d.clamp(min=1e-30)).round().clamp(0, 63)
    mc = (mn / dmin.clamp(min=1e-30)).round().clamp(0, 63)
    eff_scale, eff_min = (d * sc)[..., None], (dmin * mc)[..., None]
    q = ((sub + eff_min) / eff_scale.clamp(min=1e-30)).round().clamp(0, levels)
    q = torch.where(eff_scale > 0, q, torch.zeros_like(q))
    sc, mc = sc.to(torch.int32), mc.to(torch.int32)
    packed = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mc[:, :4] | ((mc[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 0x0F) | ((mc[:, 4:] & 0x0F) << 4)], dim=-1).to(torch.uint8)
    return torch.cat([d_bytes, m_bytes, packed], dim=-1), q.to(torch.int32)


def q4_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    head, q = _k_affine(x, 4)
    qs = _pack_bits(q.reshape(n, 4, 2, 32), 4)  # sub-blocks 2g and 2g+1 share bytes g*32..: low, high nibble
    return torch.cat([head, qs.reshape(n, 128)], dim=-1)


def q5_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    head, q = _k_affine(x, 5)
    qh = _pack_bits((q >> 4).reshape(n, 1, 8, 32), 1)  # bit j of byte i: the fifth bit of sub-block j, weight i
    qs = _pack_bits((q & 0x0F).reshape(n, 4, 2, 32), 4)
    return torch.cat([head, qh.reshape(n, 32), qs.reshape(n, 128)], dim=-1)


def q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    amax = sub.abs().amax(dim=-1)
    scale = amax / 31.5
    d_bytes, d = _f16(scale.amax(dim=-1) / 127)
    sc = (scale / d.clamp(min=1e-30)).round().clamp(-128, 127)
    eff = (d * sc)[..., None]
    q = (sub / eff.clamp(min=1e-30)).round().clamp(-32, 31)
    q = torch.where(eff > 0, q, torch.zeros_like(q)).to(torch.int32).reshape(n, QK_K) + 32
    halves = q.reshape(n, 2, 128)
    ql = _pack_bits((halves & 0x0F).reshape(n, 2, 2, 64), 4)  # weight h*128 + j*64 + b: nibble j of byte b
    qh = _pack_bits((halves >> 4).reshape(n, 2, 4, 32), 2)  # weight h*128 + j*32 + b: bits 2j of byte b
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), scales, d_bytes], dim=-1)


ENCODERS = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


def quantize(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """A float tensor whose last dimension is a multiple of 256 -> its `kind` blocks as uint8
    `[..., last / 256 * nbytes]` (the byte shape the `gguf` writer takes)."""
    if kind not in ENCODERS:
        raise ValueError(f"qimg writes K-quants {', '.join(KQUANTS)}; got {kind}")
    if tensor.shape[-1] % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} weights; this tensor's rows have "
                         f"{tensor.shape[-1]}")
    x = tensor.detach().float().cpu().reshape(-1, QK_K)
    blocks = torch.cat([ENCODERS[kind](chunk) for chunk in x.split(65536)])
    return blocks.reshape(*tensor.shape[:-1], -1)
