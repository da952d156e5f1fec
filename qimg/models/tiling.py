"""Tiled VAE encode/decode: run a function on overlapping tiles and blend them with linear ramps over the overlaps.

Tiles live on the latent grid (one cell = `f` pixels), so encode and decode cut the same places. A tile's weight ramps
linearly from ~0 at an edge it shares with a neighbour to 1 at the far side of the overlap; the output is the
weight-normalised sum. Where a pixel is covered by one tile only, it is that tile's output. Memory is bounded by one
tile's activations plus the output (and a weight plane) at full size.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

RunTiles = Callable[[Callable[[torch.Tensor], torch.Tensor], list], Iterable[torch.Tensor]]
DEFAULT_TILE_PX = 512
DEFAULT_OVERLAP_PX = 128


def resolve_tile(tile, factor: int) -> tuple[int, int] | None:
    """`tile` option -> `(size, overlap)` in latent cells, or None for no tiling.

    None/False: no tiling. True/"auto": 512 px tiles with 128 px overlap (only used if the input is larger).
    An int: tile size in pixels, overlap a quarter of it. A pair: `(size, overlap)` in pixels. Both must be multiples
    of the VAE's factor `f`, with 0 <= overlap < size."""
    if tile is None or tile is False:
        return None
    if tile is True or tile == "auto":
        size, overlap = DEFAULT_TILE_PX, DEFAULT_OVERLAP_PX
    elif isinstance(tile, int):
        size, overlap = tile, (tile // 4) // factor * factor
    elif isinstance(tile, (tuple, list)) and len(tile) == 2:
        size, overlap = (int(v) for v in tile)
    else:
        raise ValueError(f"tile must be None, True, 'auto', a size or (size, overlap) in pixels; got {tile!r}")
    if size <= 0 or size % factor or overlap % factor:
        raise ValueError(f"tile size {size} and overlap {overlap} px must be positive multiples of {factor}")
    if not 0 <= overlap < size:
        raise ValueError(f"tile overlap {overlap} px must be in [0, size={size})")
    return size // factor, overlap // factor


def tile_starts(n: int, size: int, overlap: int) -> list[int]:
    """Start cells of tiles of `size` covering `n` cells, spread evenly with at least `overlap` cells in common."""
    if n <= size:
        return [0]
    count = math.ceil((n - overlap) / (size - overlap))
    return [round(i * (n - size) / (count - 1)) for i in range(count)]


def _ramps(starts: list[int], size: int, n: int, scale: int) -> list[torch.Tensor]:
    """Per tile, a 1-D weight over its output extent: linear ramps across the overlap with each neighbour."""
    out = []
    size = min(size, n)
    for i, start in enumerate(starts):
        w = torch.ones(size * scale)
        k = (starts[i - 1] + size - start) * scale if i > 0 else 0  # overlap with the previous tile: ramp up
        if k > 0:
            w[:k] = torch.minimum(w[:k], (torch.arange(k) + 0.5) / k)
        k = (start + size - starts[i + 1]) * scale if i + 1 < len(starts) else 0  # with the next one: ramp down
        if k > 0:
            w[-k:] = torch.minimum(w[-k:], (torch.arange(k, 0, -1) - 0.5) / k)
        out.append(w)
    return out


def tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int, overlap: int, *,
          scale_in: int, scale_out: int, run_tiles: RunTiles | None = None) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of `x` `[B, C, H, W]` and blend the results.

    The grid has `H / scale_in` x `W / scale_in` cells; tiles are `size` cells with `overlap` cells in common; `fn`
    maps a tile of `s * scale_in` pixels to `s * scale_out` pixels. If `x` fits in one tile, this is just `fn(x)`.
    `run_tiles(fn, tiles)` yields `fn` of each tile in order (default: one after another, here; a parallel run
    shares them across its ranks)."""
    rows, cols = x.shape[2] // scale_in, x.shape[3] // scale_in
    if rows <= size and cols <= size:
        return fn(x)
    ys, xs = tile_starts(rows, size, overlap), tile_starts(cols, size, overlap)
    wy, wx = _ramps(ys, size, rows, scale_out), _ramps(xs, size, cols, scale_out)
    places = [(y0, ry, x0, rx) for y0, ry in zip(ys, wy) for x0, rx in zip(xs, wx)]
    tiles = [x[:, :, y0 * scale_in:(y0 + size) * scale_in, x0 * scale_in:(x0 + size) * scale_in]
             for y0, _, x0, _ in places]
    outputs = run_tiles(fn, tiles) if run_tiles is not None else (fn(t) for t in tiles)
    out = weight = None
    for (y0, ry, x0, rx), part in zip(places, outputs):
        if out is None:
            # accumulate in float32 whatever the model's dtype
            out = part.new_zeros(*part.shape[:2], rows * scale_out, cols * scale_out, dtype=torch.float32)
            weight = torch.zeros(rows * scale_out, cols * scale_out, device=part.device, dtype=torch.float32)
        w = (ry[:, None] * rx[None, :]).to(part.device)
        ya, xa = y0 * scale_out, x0 * scale_out
        region = (slice(ya, ya + w.shape[0]), slice(xa, xa + w.shape[1]))
        out[(..., *region)] += part.float() * w
        weight[region] += w
    return (out / weight).to(part.dtype)
