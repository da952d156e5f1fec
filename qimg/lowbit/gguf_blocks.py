"""GGUF (ggml) block formats dequantised in torch, on whatever device holds the blocks.

A quantised tensor is rows of blocks; each block packs `elements` weights into `nbytes` bytes: one or two float16
scales and the quantised values (4, 5, 6 or 8 bits), K-quants with 6-bit sub-block scales. Every decoder takes the
blocks as a `[n, nbytes]` uint8 tensor and returns `[n, elements]` float32, computed in the same order of float32
operations as the `gguf` package's reference dequantisation, so the results agree to the last bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

QK_K = 256


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Bytes `[n, 2]` -> float32 `[n, 1]` (little-endian float16)."""
    return raw.contiguous().view(torch.float16).float()


def _u32(raw: torch.Tensor) -> torch.Tensor:
    """Bytes `[n, 4]` -> int64 `[n, 1]` (little-endian uint32)."""
    r = raw.long()
    return (r[:, 0:1] | (r[:, 1:2] << 8) | (r[:, 2:3] << 16) | (r[:, 3:4] << 24))


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """`[n, k]` bytes -> `[n, 2k]`: the low nibbles of all bytes, then the high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """`[n, g, b]` bytes -> `[n, g, count, b]`: field j is `(byte >> (width * j)) & mask`."""
    shifts = torch.arange(count, device=packed.device, dtype=torch.uint8).mul_(width).view(1, 1, count, 1)
    return (packed.unsqueeze(2) >> shifts) & ((1 << width) - 1)


def q8_0(b):
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def q4_0(b):
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def q4_1(b):
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    high = (_u32(qh) >> torch.arange(32, device=qh.device)) & 1
    return _nibbles(qs) | (high.to(torch.uint8) << 4)


def q5_0(b):
    return _f16(b[:, :2]) * (_five_bits(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16).float()


def q5_1(b):
    return _f16(b[:, :2]) * _five_bits(b[:, 4:8], b[:, 8:]).float() + _f16(b[:, 2:4])


def q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def q3_k(b):
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _bits(packed[:, :8].reshape(n, 1, 8), 4, 2).reshape(n, 16)
    high = _bits(packed[:, 8:].reshape(n, 1, 4), 2, 4).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), 1, 8).reshape(n, 16, 16) ^ 1  # a set bit means no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K block -> 8 six-bit scales and 8 six-bit mins."""
    n = packed.shape[0]
    d, m, md = packed.reshape(n, 3, 4).unbind(1)
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    low = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, low


def _k_affine(b, q: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scale, low = _k_scales(b[:, 4:16])
    d = (_f16(b[:, :2]) * scale.float()).view(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * low.float()).view(n, 8, 1)
    return (d * q.float() - dm).reshape(n, QK_K)


def q4_k(b):
    n = b.shape[0]
    return _k_affine(b, _bits(b[:, 16:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32))


def q5_k(b):
    n = b.shape[0]
    ql = _bits(b[:, 48:].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 32), 1, 8).reshape(n, 8, 32)
    return _k_affine(b, ql | (qh << 4))


def q6_k(b):
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    d = (d * scales.contiguous().view(torch.int8).float()).view(n, 16, 1)
    low = _bits(ql.reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, QK_K)


def _plain(dtype):
    return lambda b: b.contiguous().view(dtype).float()


@dataclass(frozen=True)
class BlockFormat:
    name: str
    elements: int  # weights per block
    nbytes: int  # bytes per block
    decode: Callable[[torch.Tensor], torch.Tensor]


FORMATS = {f.name: f for f in [
    BlockFormat("F32", 1, 4, _plain(torch.float32)), BlockFormat("F16", 1, 2, _plain(torch.float16)),
    BlockFormat("BF16", 1, 2, _plain(torch.bfloat16)),
    BlockFormat("Q8_0", 32, 34, q8_0), BlockFormat("Q4_0", 32, 18, q4_0), BlockFormat("Q4_1", 32, 20, q4_1),
    BlockFormat("Q5_0", 32, 22, q5_0), BlockFormat("Q5_1", 32, 24, q5_1),
    BlockFormat("Q2_K", QK_K, 84, q2_k), BlockFormat("Q3_K", QK_K, 110, q3_k), BlockFormat("Q4_K", QK_K, 144, q4_k),
    BlockFormat("Q5_K", QK_K, 176, q5_k), BlockFormat("Q6_K", QK_K, 210, q6_k),
]}


CHUNK_WEIGHTS = 1 << 22  # decoded at a time: the float32 scratch of a large layer stays small


def dequantize(raw: torch.Tensor, kind: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """The tensor of `shape` that `raw` (its bytes as uint8, in file order) encodes in format `kind`, as `dtype`
    (decoded in float32 a few million weights at a time, each cast on the way: the same numbers as casting the
    whole float32 tensor, without holding it)."""
    fmt = FORMATS.get(kind)
    if fmt is None:
        raise ValueError(f"quantization type {kind} is not supported (qimg reads: {', '.join(FORMATS)})")
    count = 1
    for size in shape:
        count *= size
    if count % fmt.elements or raw.numel() != count // fmt.elements * fmt.nbytes:
        raise ValueError(f"{kind} data of {raw.numel():,} bytes cannot hold a tensor of shape {tuple(shape)} "
                         f"({fmt.nbytes} bytes per {fmt.elements} weights)")
    blocks = raw.reshape(-1, fmt.nbytes)
    step = max(1, CHUNK_WEIGHTS // fmt.elements)
    if blocks.shape[0] <= step:
        return fmt.decode(blocks).to(dtype).reshape(shape)
    out = torch.empty(count, dtype=dtype, device=raw.device)
    for start in range(0, blocks.shape[0], step):
        part = blocks[start:start + step]
        out[start * fmt.elements:(start + part.shape[0]) * fmt.elements] = fmt.decode(part).reshape(-1)
    return out.reshape(shape)
