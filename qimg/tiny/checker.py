"""A programmatic judge for 128x128 images of the tiny world (``qimg.tiny.world``).

``analyse`` reads an image back into a scene description:

* background = the most common palette colour (nearest colour per pixel);
* every pixel is explained as a blend of the background and one palette colour
  (colour and alpha along the background->colour line: antialiased edges of a
  red shape on yellow read as "red at 50%", not as orange);
* foreground pixels (alpha >= 0.5, isolated specks dropped) are split into
  4-connected components, each given to the cell holding its bounding-box
  centre (every item of the world fits inside its cell; a slightly shifted one
  still lands in the right cell). A cell is then empty, an object or a word: a
  word is 2+ column-separated parts (the renderer keeps 3 px between letters),
  an object a single one;
* objects: colour = alpha-weighted majority; size from the bounding-box extent
  (small ~22 px, large ~40 px); shape from where the mass sits (a triangle has
  ~1/4 of its mass in its top half) and how full the bounding box is at its
  corners (square ~1, circle ~0.1);
* words: letters are segmented by column projection, matched against templates
  cut from the bundled DejaVu Sans Bold glyphs, and the best few readings are
  verified by re-rendering them in the cell and comparing alphas.

Scores: ``score_t2i``, ``score_edit``, ``score_layers``. PSNRs are capped at
100 dB (identical images) so results stay JSON-friendly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from qimg.errors import InputError
from qimg.tiny import world as W

PALETTE_NAMES: tuple[str, ...] = tuple(W.COLOURS)
PALETTE = np.asarray([W.COLOURS[c] for c in PALETTE_NAMES], np.float32)
MIN_ITEM_PIXELS = 30  # fewer foreground pixels than this: the cell is empty
MIN_SEGMENT_PIXELS = 6  # components / column runs smaller than this are specks
WINDOW_MARGIN = 8  # px around a cell box searched for its (possibly shifted) item
LARGE_EXTENT = 31  # px: boundary between small (22) and large (40)
TRIANGLE_TOP_MASS = 0.38  # triangle: 0.25 of its mass in the top half; others 0.5
SQUARE_CORNERS = 0.6  # corner-patch occupancy: square ~1, circle ~0.1
TEMPLATE_SIZE = (16, 20)  # (w, h) letters are normalised to
READ_CANDIDATES = 3  # at most this many letters per position are verified ...
VERIFY_MARGIN = 0.04  # ... those whose template score is this close to the best
PSNR_CAP = 100.0
FAINT = 16.0  # RGB distance from the background below which a pixel is background


@dataclass(frozen=True)
class CellReading:
    """What the checker saw in one cell window."""

    cell: int
    kind: str  # "empty" | "object" | "word"
    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    text: str | None = None
    pixels: int = 0
    extent: int = 0
    fill: float = 0.0
    top_mass: float = 0.0
    corners: float = 0.0


@dataclass(frozen=True)
class Detection:
    """An image read back as a (possibly invalid) scene, plus per-cell details."""

    background: str
    cells: tuple[CellReading, ...]
    objects: tuple[W.Obj, ...] = field(default=())
    words: tuple[W.Word, ...] = field(default=())

    @property
    def word(self) -> W.Word | None:
        return self.words[0] if len(self.words) == 1 else None

    def as_scene(self) -> W.Scene:
        """The detection as a Scene (not validated: may break the grammar)."""
        return W.Scene(self.background, self.objects, self.word)


# ----------------------------------------------------------------------------- pixels


def to_array(image) -> np.ndarray:
    """A PIL image or array as (128, 128, 3) float32 RGB (resized if needed)."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (W.CANVAS, W.CANVAS):
            image = image.resize((W.CANVAS, W.CANVAS), Image.Resampling.BILINEAR)
        return np.asarray(image, np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.shape[:2] != (W.CANVAS, W.CANVAS):
        return to_array(Image.fromarray(arr.astype(np.uint8)[..., :3]))
    return arr[..., :3].astype(np.float32)


def nearest_colours(img: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of each pixel's nearest palette colour."""
    score = img @ (-2 * PALETTE.T) + (PALETTE * PALETTE).sum(axis=1)  # |x-p|^2 - |x|^2
    return score.argmin(axis=-1)


def explain(img: np.ndarray, background: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: the colour that best explains it as a blend with the background
    (least squared residual), that colour's alpha, and all alphas (H, W, 8).

    Pixels within FAINT of the background (every alpha < 0.2) are left at alpha 0."""
    b = PALETTE[background]
    v = PALETTE - b
    norm = (v * v).sum(axis=1)
    norm[background] = 1.0
    d = img - b
    h, w, _ = img.shape
    alphas = np.zeros((h, w, len(PALETTE)), np.float32)
    best = np.full((h, w), background)
    near = np.einsum("hwc,hwc->hw", d, d) >= FAINT**2
    if not near.any():
        return best, alphas[..., 0], alphas
    dn = d[near]
    dot = dn @ v.T  # (N, 8)
    a = np.clip(dot / norm, 0.0, 1.0)
    a[:, background] = 0.0
    resid = -a * (2 * dot - a * norm)  # squared residual minus |d|^2 (same per pixel)
    resid[:, background] = np.inf
    best[near] = resid.argmin(axis=-1)
    alphas[near] = a
    alpha = np.take_along_axis(alphas, best[..., None], axis=-1)[..., 0]
    return best, alpha, alphas


# ----------------------------------------------------------------------------- analyse


def analyse(image) -> Detection:
    """Read an image back into a Detection (background, objects, words)."""
    background, best, alpha, alphas, by_cell = _explain_cells(to_array(image))
    cells = tuple(_read_cell(c, by_cell[c], best, alpha, alphas) for c in range(9))
    objects = tuple(W.Obj(r.shape, r.size, r.colour, r.cell) for r in cells if r.kind == "object")
    words = tuple(W.Word(r.text, r.colour, r.cell) for r in cells if r.kind == "word")
    return Detection(PALETTE_NAMES[background], cells, objects, words)


def _explain_cells(img: np.ndarray):
    """(background index, ``explain``'s three maps, the cleaned foreground's components by cell) of an image."""
    labels = nearest_colours(img[::2, ::2])  # a quarter of the pixels settles the mode
    background = int(np.bincount(labels.ravel(), minlength=len(PALETTE)).argmax())
    best, alpha, alphas = explain(img, background)
    return background, best, alpha, alphas, components_by_cell(clean_mask(alpha >= 0.5))


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Drop isolated pixels (fewer than 2 of their 8 neighbours set): noise specks."""
    padded = np.pad(mask, 1).astype(np.uint8)
    h, w = mask.shape
    neighbours = sum(padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)) - mask
    return mask & (neighbours >= 2)


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of a boolean mask: (row, start, stop) arrays in row-major order."""
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    ys, xs = np.nonzero(np.diff(padded, axis=1))
    return ys[0::2], xs[0::2], xs[1::2]


def run_components(rows: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """4-connected component id of each run (union-find over overlapping runs of
    consecutive rows)."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    r, st, sp = rows.tolist(), starts.tolist(), stops.tolist()
    prev, i = (0, 0), 0
    while i < len(r):
        j = i
        while j < len(r) and r[j] == r[i]:
            j += 1
        if prev[1] > prev[0] and r[prev[0]] == r[i] - 1:
            a = prev[0]
            for k in range(i, j):
                while a < prev[1] and sp[a] <= st[k]:
                    a += 1
                b = a
                while b < prev[1] and st[b] < sp[k]:
                    ra, rb = find(b), find(k)
                    parent[max(ra, rb)] = min(ra, rb)
                    b += 1
        prev, i = (i, j), j
    return np.array([find(i) for i in range(len(r))], int)


def components_by_cell(mask: np.ndarray) -> list[np.ndarray]:
    """For each cell, the mask of the connected components whose bounding-box centre
    lies in it (so an item a little off its cell centre still reads as one item)."""
    rows, starts, stops = mask_runs(mask)
    ids = run_components(rows, starts, stops)
    out = [np.zeros_like(mask) for _ in range(9)]
    for comp in np.unique(ids):
        sel = ids == comp
        if (stops[sel] - starts[sel]).sum() < MIN_SEGMENT_PIXELS:
            continue
        cy = (rows[sel].min() + rows[sel].max() + 1) / 2
        cx = (starts[sel].min() + stops[sel].max()) / 2
        cell = min(int(cy // W.CELL), 2) * 3 + min(int(cx // W.CELL), 2)
        for y, s, e in zip(rows[sel], starts[sel], stops[sel]):
            out[cell][y, s:e] = True
    return out


def read_window(cell: int) -> tuple[int, int, int, int]:
    """The cell box widened by WINDOW_MARGIN px (clipped to the canvas)."""
    x0, y0, x1, y1 = W.cell_box(cell)
    m = WINDOW_MARGIN
    return max(0, x0 - m), max(0, y0 - m), min(W.CANVAS, x1 + m), min(W.CANVAS, y1 + m)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    shifts = [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.logical_or.reduce(shifts)


def _read_cell(
    cell: int, cell_mask: np.ndarray, best: np.ndarray, alpha: np.ndarray, alphas: np.ndarray
) -> CellReading:
    fg, colour, item = _cell_item(cell, cell_mask, best, alpha, alphas)
    if colour is None:
        return CellReading(cell, "empty", pixels=int(fg.sum()))
    mask = fg & (item >= 0.5)
    segments = column_segments(mask)
    name = PALETTE_NAMES[colour]
    if not segments:
        return CellReading(cell, "empty", pixels=int(mask.sum()))
    if len(segments) >= 2:
        return CellReading(cell, "word", name, text=read_word(item, segments, cell), pixels=int(mask.sum()))
    return _read_object(cell, name, item, mask)


def _cell_item(cell: int, cell_mask: np.ndarray, best: np.ndarray, alpha: np.ndarray, alphas: np.ndarray):
    """(foreground over ``read_window(cell)``, the item's palette index, its soft alpha) of the cell's item: its
    majority colour's alpha near its components only, faint noise dropped; (fg, None, None) when too few pixels."""
    x0, y0, x1, y1 = read_window(cell)
    fg = cell_mask[y0:y1, x0:x1]
    if fg.sum() < MIN_ITEM_PIXELS:
        return fg, None, None
    b, a = best[y0:y1, x0:x1], alpha[y0:y1, x0:x1]
    colour = int(np.bincount(b[fg], weights=a[fg], minlength=len(PALETTE)).argmax())
    item = alphas[y0:y1, x0:x1, colour] * _dilate(_dilate(fg))  # this item's soft alpha only
    return fg, colour, np.where(item >= 0.2, item, 0.0)


def cell_ink(image, cell: int) -> tuple[str, np.ndarray] | None:
    """(colour, soft alpha over ``read_window(cell)``) of the item the checker reads in `cell`, None when the cell
    is empty: what ``render_distance`` compares with a word's render."""
    _, best, alpha, alphas, by_cell = _explain_cells(to_array(image))
    _, colour, item = _cell_item(cell, by_cell[cell], best, alpha, alphas)
    return None if colour is None else (PALETTE_NAMES[colour], item)


def column_segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of columns holding mask pixels; runs of specks are dropped."""
    count = mask.sum(axis=0)
    inked = np.concatenate([[False], count > 0, [False]])
    edges = np.flatnonzero(inked[1:] != inked[:-1])
    runs = list(zip(edges[::2], edges[1::2]))
    return [(int(s), int(e)) for s, e in runs if count[s:e].sum() >= MIN_SEGMENT_PIXELS]


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _read_object(cell: int, colour: str, item: np.ndarray, mask: np.ndarray) -> CellReading:
    r0, r1, c0, c1 = _bbox(mask)
    box, solid = item[r0:r1, c0:c1], mask[r0:r1, c0:c1]
    h, w = box.shape
    mass = float(box.sum())
    top_mass = float(box[: h // 2].sum() + (box[h // 2].sum() / 2 if h % 2 else 0)) / mass
    corners = corner_fill(solid)
    if top_mass < TRIANGLE_TOP_MASS:
        shape = "triangle"
    else:
        shape = "square" if corners >= SQUARE_CORNERS else "circle"
    size = "large" if max(h, w) >= LARGE_EXTENT else "small"
    return CellReading(
        cell, "object", colour, shape, size, pixels=int(mask.sum()), extent=max(h, w),
        fill=mass / (h * w), top_mass=top_mass, corners=corners,
    )


def corner_fill(solid: np.ndarray) -> float:
    """Mean occupancy of the four corner patches (1/5 of the side) of a bounding box:
    ~1 for a square, ~0.1 for a circle."""
    h, w = solid.shape
    k = max(2, round(0.2 * min(h, w)))
    return float(np.mean([solid[:k, :k].mean(), solid[:k, -k:].mean(), solid[-k:, :k].mean(), solid[-k:, -k:].mean()]))


# ----------------------------------------------------------------------------- letters


def _normalise_crop(crop: np.ndarray) -> np.ndarray:
    """A letter's alpha cropped to its ink box, resized to TEMPLATE_SIZE, unit norm
    (not mean-subtracted: an "I" is a plain bar and must stay distinguishable)."""
    rows = np.flatnonzero(crop.max(axis=1) >= 0.25)
    cols = np.flatnonzero(crop.max(axis=0) >= 0.25)
    if rows.size == 0 or cols.size == 0:
        return np.zeros(TEMPLATE_SIZE[::-1], np.float32)
    crop = np.ascontiguousarray(crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], np.float32)
    out = np.asarray(Image.fromarray(crop).resize(TEMPLATE_SIZE, Image.Resampling.BILINEAR))
    return out / (np.linalg.norm(out) + 1e-6)


@lru_cache(maxsize=None)
def templates() -> np.ndarray:
    """(26, h, w) normalised letter templates from the bundled font (rendered at
    1x the way the world renders words)."""
    out = []
    for ch in W.LETTERS:
        glyph = W.glyph_mask(ch)
        h = glyph.shape[0] // W.SS * W.SS
        w = -(-glyph.shape[1] // W.SS) * W.SS
        padded = np.zeros((h, w), np.float32)
        padded[:, : glyph.shape[1]] = glyph[:h]
        small = padded.reshape(h // W.SS, W.SS, w // W.SS, W.SS).mean(axis=(1, 3))
        out.append(_normalise_crop(small))
    return np.stack(out)


def letter_scores(crop: np.ndarray) -> np.ndarray:
    """(26,) correlation of a letter crop with each template (higher is better)."""
    return (templates() * _normalise_crop(crop)).sum(axis=(1, 2))


def read_word(item: np.ndarray, segments: list[tuple[int, int]], cell: int) -> str:
    """Read the letters of a word from its alpha (cell window) and column segments."""
    scores = [letter_scores(item[:, s:e]) for s, e in segments]
    best = "".join(W.LETTERS[int(s.argmax())] for s in scores)
    if len(segments) not in (2, 3):
        return best
    options = [_close_letters(s) for s in scores]
    if all(len(o) == 1 for o in options):
        return best
    candidates = ["".join(p) for p in itertools.product(*options)]
    return min(candidates, key=lambda text: render_distance(item, text, cell))


def _close_letters(scores: np.ndarray) -> list[str]:
    """The best letter and up to READ_CANDIDATES-1 others scoring within VERIFY_MARGIN."""
    order = np.argsort(-scores)[:READ_CANDIDATES]
    return [W.LETTERS[i] for i in order if scores[i] >= scores[order[0]] - VERIFY_MARGIN]


def render_distance(item: np.ndarray, text: str, cell: int) -> float:
    """L1 distance between an observed word alpha (over ``read_window(cell)``) and
    ``text`` rendered in ``cell``, after aligning their ink boxes (so slightly
    shifted words still read)."""
    px, py, patch = W.word_alpha(text, cell)
    wx, wy, _, _ = read_window(cell)
    rendered = np.zeros_like(item)
    rendered[py - wy : py - wy + patch.shape[0], px - wx : px - wx + patch.shape[1]] = patch / 255
    (r0, _, c0, _), (q0, _, d0, _) = _bbox(item >= 0.5), _bbox(rendered >= 0.5)
    shifted = np.roll(rendered, (r0 - q0, c0 - d0), axis=(0, 1))
    return float(np.abs(shifted - item).sum())


# ----------------------------------------------------------------------------- scores


def score_t2i(image, scene: W.Scene, detection: Detection | None = None) -> dict:
    """Per-object correctness and ``exact`` for a generated image of ``scene``."""
    det = detection or analyse(image)
    objects = [_score_object(det.cells[o.cell], o) for o in scene.objects]
    expected = scene.occupied()
    extra = [r.cell for r in det.cells if r.kind != "empty" and r.cell not in expected]
    word = _score_word(det, scene.word)
    background = det.background == scene.background
    all_objects = all(o["correct"] for o in objects)
    exact = background and all_objects and not extra and word["word_ok"]
    n = len(objects)
    return {
        "exact": exact,
        "background": background,
        "objects": objects,
        "object_accuracy": sum(o["correct"] for o in objects) / n,
        "colour_accuracy": sum(o["colour"] for o in objects) / n,
        "shape_accuracy": sum(o["shape"] for o in objects) / n,
        "size_accuracy": sum(o["size"] for o in objects) / n,
        "position_accuracy": sum(o["position"] for o in objects) / n,
        "extra_cells": extra,
        "word_exact": word["word_exact"],
        "word_colour": word["word_colour"],
        "word_read": word["word_read"],
        "detected": describe(det),
    }


def _score_object(r: CellReading, o: W.Obj) -> dict:
    found = r.kind == "object"
    out = {
        "cell": o.cell,
        "position": found,
        "colour": found and r.colour == o.colour,
        "shape": found and r.shape == o.shape,
        "size": found and r.size == o.size,
        "read_as": r.shape if found else r.kind,  # what the checker saw in the cell (a shape, "empty", "word")
    }
    out["correct"] = out["position"] and out["colour"] and out["shape"] and out["size"]
    return out


def _score_word(det: Detection, word: W.Word | None) -> dict:
    if word is None:
        return {"word_ok": True, "word_exact": None, "word_colour": None, "word_read": None}
    r = det.cells[word.cell]
    read = r.text if r.kind == "word" else None
    exact = read == word.text
    colour = r.kind == "word" and r.colour == word.colour
    return {"word_ok": exact and colour, "word_exact": exact, "word_colour": colour, "word_read": read}


def describe(det: Detection) -> str:
    """A human-readable summary of a detection (prompt-like; for logs)."""
    parts = [f"{r.size} {r.colour} {r.shape} @{r.cell}" for r in det.cells if r.kind == "object"]
    parts += [f'"{r.text}" {r.colour} @{r.cell}' for r in det.cells if r.kind == "word"]
    return ", ".join(parts) + f" on {det.background}"


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between two uint8-range images over ``mask`` (capped at PSNR_CAP)."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    if mask is not None:
        if not mask.any():
            raise InputError("PSNR over an empty region")
        diff = diff[mask]
    mse = float(diff.mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def _items_by_cell(scene: W.Scene) -> dict[int, object]:
    items: dict[int, object] = {o.cell: o for o in scene.objects}
    if scene.word is not None:
        items[scene.word.cell] = scene.word
    return items


def untouched_mask(source: W.Scene, target: W.Scene) -> np.ndarray:
    """(H, W) bool: pixels an edit from ``source`` to ``target`` should not change.

    Normally everything outside the cells whose item changed. When the background
    changes, the fully opaque pixels of the items that did not change."""
    src, tgt = _items_by_cell(source), _items_by_cell(target)
    changed = {c for c in set(src) | set(tgt) if src.get(c) != tgt.get(c)}
    mask = np.ones((W.CANVAS, W.CANVAS), bool)
    if source.background != target.background:
        mask[:] = False
        for layer, cell in zip(W.layer_arrays(source)[1:], _layer_cells(source)):
            if cell not in changed:
                mask |= layer[..., 3] == 255
        return mask
    for c in changed:
        x0, y0, x1, y1 = W.cell_box(c)
        mask[y0:y1, x0:x1] = False
    return mask


def _layer_cells(scene: W.Scene) -> list[int]:
    return [o.cell for o in scene.objects] + ([scene.word.cell] if scene.word else [])


def score_edit(source_image, output_image, source_scene: W.Scene, target_scene: W.Scene) -> dict:
    """``satisfied``: the output reads as the target scene; ``untouched_psnr``: PSNR
    between source and output over the pixels the edit should leave alone."""
    target_score = score_t2i(output_image, target_scene)
    mask = untouched_mask(source_scene, target_scene)
    untouched = psnr(to_array(source_image), to_array(output_image), mask) if mask.any() else None
    return {
        "satisfied": target_score["exact"],
        "untouched_psnr": untouched,
        "untouched_pixels": int(mask.sum()),
        "target": target_score,
    }


# ----------------------------------------------------------------------------- layers


def _rgba(layer) -> np.ndarray:
    arr = np.asarray(layer.convert("RGBA") if isinstance(layer, Image.Image) else layer, np.float32)
    if arr.ndim != 3 or arr.shape[2] != 4:
        raise InputError(f"a layer must be HxWx4 RGBA, got shape {arr.shape}")
    return arr


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """sum(min) / sum(max) of two alpha maps in [0, 1] (1.0 when both are empty)."""
    top = float(np.maximum(a, b).sum())
    return 1.0 if top == 0 else float(np.minimum(a, b).sum()) / top


def assignment(score: np.ndarray) -> list[tuple[int, int]]:
    """Maximum-total-score matching of rows to columns (Hungarian algorithm)."""
    flip = score.shape[0] > score.shape[1]
    cost = -(score.T if flip else score)
    pairs = _hungarian(cost)
    return [(j, i) for i, j in pairs] if flip else pairs


def _hungarian(cost: np.ndarray) -> list[tuple[int, int]]:
    """Min-cost assignment of every row of an n x m cost matrix (n <= m)."""
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p, way = np.zeros(m + 1, int), np.zeros(m + 1, int)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, bool)
        while p[j0] != 0 or j0 == 0:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = ~used[1:] & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            free = np.flatnonzero(~used[1:]) + 1
            j1 = free[np.argmin(minv[free])]
            delta = minv[j1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return sorted((int(p[j]) - 1, j - 1) for j in range(1, m + 1) if p[j] != 0)


def score_layers(pred_layers, true_layers) -> dict:
    """Match predicted to true RGBA layers by alpha IoU and score the stack.

    mean_alpha_iou: matched soft IoUs summed over max(#pred, #true) (unmatched
    layers count 0); rgb_l1: per matched pair, the true-alpha-weighted mean |RGB|
    error in [0, 1], averaged over pairs; composite_psnr: the composited predicted
    stack vs the true one."""
    pred, true = [_rgba(x) for x in pred_layers], [_rgba(x) for x in true_layers]
    if not pred or not true:
        raise InputError(f"need layers on both sides, got {len(pred)} predicted and {len(true)} true")
    iou = np.array([[soft_iou(p[..., 3] / 255, t[..., 3] / 255) for t in true] for p in pred])
    pairs = assignment(iou)
    l1 = [_weighted_l1(pred[i], true[j]) for i, j in pairs]
    return {
        "matches": [(i, j, float(iou[i, j])) for i, j in pairs],
        "mean_alpha_iou": float(sum(iou[i, j] for i, j in pairs)) / max(len(pred), len(true)),
        "rgb_l1": float(np.mean(l1)),
        "layer_rgb_l1": l1,
        "composite_psnr": psnr(_composite(pred), _composite(true)),
        "n_pred": len(pred),
        "n_true": len(true),
    }


def _weighted_l1(pred: np.ndarray, true: np.ndarray) -> float:
    weight = true[..., 3]
    err = np.abs(pred[..., :3] - true[..., :3]).mean(axis=-1)
    return float((err * weight).sum() / max(float(weight.sum()), 1e-9) / 255)


def _composite(layers: list[np.ndarray]) -> np.ndarray:
    return W.composite_array([np.clip(np.rint(x), 0, 255).astype(np.uint8) for x in layers])
