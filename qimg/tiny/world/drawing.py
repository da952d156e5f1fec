"""Rendering scenes: 4x4-supersampled analytic shapes and FreeType glyphs, whole pictures and RGBA layers."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qimg.errors import InputError
from qimg.tiny.world.scene import (_WORD_RE, ALL_COLOURS, CANVAS, CAP_PX, CELL, FONT_PATH, LETTERS, SIZES, SS,
                                   WORD_GAP_PX, WORD_MAX_W_PX, Scene)


def cell_centre(cell: int) -> tuple[float, float]:
    """(x, y) of a cell centre in pixels."""
    row, col = divmod(cell, 3)
    return ((col + 0.5) * CELL, (row + 0.5) * CELL)


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """Integer pixel window (x0, y0, x1, y1) of a cell; every item fits inside its window."""
    row, col = divmod(cell, 3)
    edges = [round(i * CELL) for i in range(4)]
    return (edges[col], edges[row], edges[col + 1], edges[row + 1])


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, side: float) -> np.ndarray:
    h = side / 2
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # apex up, base = height = side
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise InputError(f"unknown shape {shape!r}")


@lru_cache(maxsize=None)
def shape_alpha(shape: str, size: str, cell: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, alpha uint8 patch) of one object, 4x4 supersampled."""
    cx, cy = cell_centre(cell)
    x0, y0, x1, y1 = cell_box(cell)
    sub = (np.arange(SS) + 0.5) / SS
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel() - cx
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel() - cy
    inside = _inside(shape, xs[None, :], ys[:, None], SIZES[size])
    cover = inside.reshape(y1 - y0, SS, x1 - x0, SS).mean(axis=(1, 3))
    patch = np.rint(cover * 255).astype(np.uint8)
    patch.setflags(write=False)
    return x0, y0, patch


@lru_cache(maxsize=None)
def _font() -> ImageFont.FreeTypeFont:
    probe = ImageFont.truetype(str(FONT_PATH), 100)
    top = probe.getbbox("H", anchor="ls")[1]
    return ImageFont.truetype(str(FONT_PATH), round(100 * CAP_PX * SS / -top))


@lru_cache(maxsize=None)
def _glyph_canvas(letter: str) -> np.ndarray:
    """Float mask of one capital at 4x on a fixed canvas; baseline at row ``_baseline()``."""
    if len(letter) != 1 or letter not in LETTERS:
        raise InputError(f"cannot render letter {letter!r}")
    font = _font()
    img = Image.new("L", (font.size * 2, round(font.size * 1.3)))
    ImageDraw.Draw(img).text((font.size // 2, _baseline()), letter, fill=255, font=font, anchor="ls")
    return np.asarray(img, dtype=np.float32) / 255


def _baseline() -> int:
    return round(_font().size * 0.95)


@lru_cache(maxsize=None)
def _ink_rows() -> tuple[int, int]:
    """Rows [top, bottom) holding ink for any capital (shared by all glyph masks)."""
    rows = np.flatnonzero(np.max([_glyph_canvas(ch).max(axis=1) for ch in LETTERS], axis=0) > 0)
    return int(rows[0]), int(rows[-1]) + 1


@lru_cache(maxsize=None)
def glyph_mask(letter: str) -> np.ndarray:
    """Float mask of one capital at 4x, cropped to its ink columns and to ``_ink_rows()``."""
    canvas = _glyph_canvas(letter)
    cols = np.flatnonzero(canvas.max(axis=0) > 0)
    top, bottom = _ink_rows()
    out = np.ascontiguousarray(canvas[top:bottom, cols[0] : cols[-1] + 1])
    out.setflags(write=False)
    return out


def word_mask_4x(text: str) -> np.ndarray:
    """The word's float mask at 4x: glyph ink boxes, 3 px gaps, squeezed to 40 px if wider."""
    glyphs = [glyph_mask(ch) for ch in text]
    gap = WORD_GAP_PX * SS
    natural = sum(g.shape[1] for g in glyphs)
    squeeze = min(1.0, (WORD_MAX_W_PX * SS - gap * (len(glyphs) - 1)) / natural)
    parts = []
    for i, g in enumerate(glyphs):
        w = max(1, round(g.shape[1] * squeeze))
        if w != g.shape[1]:
            g = np.asarray(Image.fromarray(g).resize((w, g.shape[0]), Image.Resampling.BOX))
        parts.append(g if i == 0 else np.pad(g, ((0, 0), (gap, 0))))
    return np.clip(np.concatenate(parts, axis=1), 0, 1)


@lru_cache(maxsize=8192)
def word_alpha(text: str, cell: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, alpha uint8 patch) of a word centred (on its capitals) in a cell."""
    if not _WORD_RE.match(text):
        raise InputError(f"word {text!r} is not 2-3 uppercase letters A-Z")
    word = word_mask_4x(text)
    x0, y0, x1, y1 = cell_box(cell)
    cx, cy = cell_centre(cell)
    cap_top = _baseline() - CAP_PX * SS - _ink_rows()[0]  # cap top row inside the mask
    left = round(cx * SS - word.shape[1] / 2)  # canvas coordinates at 4x
    top = round(cy * SS - CAP_PX * SS / 2) - cap_top
    px0, py0 = left // SS, top // SS
    px1, py1 = -(-(left + word.shape[1]) // SS), -(-(top + word.shape[0]) // SS)
    if px0 < x0 or py0 < y0 or px1 > x1 or py1 > y1:
        raise InputError(f"word {text!r} does not fit cell {cell}")
    canvas = np.zeros(((py1 - py0) * SS, (px1 - px0) * SS), np.float32)
    canvas[top - py0 * SS :][: word.shape[0], left - px0 * SS :][:, : word.shape[1]] = word
    cover = canvas.reshape(py1 - py0, SS, px1 - px0, SS).mean(axis=(1, 3))
    patch = np.zeros((y1 - y0, x1 - x0), np.uint8)
    patch[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] = np.rint(cover * 255)
    patch.setflags(write=False)
    return x0, y0, patch


def _items(scene: Scene) -> list[tuple[str, tuple[int, int, np.ndarray]]]:
    """(colour, (x0, y0, alpha patch)) for each object then the word, bottom to top."""
    items = [(o.colour, shape_alpha(o.shape, o.size, o.cell)) for o in scene.objects]
    if scene.word is not None:
        items.append((scene.word.colour, word_alpha(scene.word.text, scene.word.cell)))
    return items


@lru_cache(maxsize=None)
def _rgb(colour: str) -> tuple[np.float32, ...]:
    return tuple(np.float32(v) for v in ALL_COLOURS[colour])


@lru_cache(maxsize=None)
def _plain(colour: str, alpha: int, dtype: str) -> np.ndarray:
    """A read-only full canvas of one colour: (3, H, W) float32, or (H, W, 4) uint8 RGBA."""
    if dtype == "float32":
        arr = np.stack([np.full((CANVAS, CANVAS), v, np.float32) for v in _rgb(colour)])
    else:
        arr = np.tile(np.asarray((*ALL_COLOURS[colour], alpha), np.uint8), (CANVAS, CANVAS, 1))
    arr.setflags(write=False)
    return arr


def _alpha(patch_u8: np.ndarray) -> np.ndarray:
    return patch_u8.astype(np.float32) * np.float32(1 / 255)


def render_array(scene: Scene) -> np.ndarray:
    """The scene as a (128, 128, 3) uint8 array.

    Per pixel and channel: out = out * (1 - a) + colour * a in float32, the same
    arithmetic as ``composite_array``, so both agree bit for bit."""
    out = _plain(scene.background, 255, "float32").copy()
    for colour, (x0, y0, patch) in _items(scene):
        h, w = patch.shape
        a = _alpha(patch)
        inv = np.float32(1) - a
        for ch, value in enumerate(_rgb(colour)):
            region = out[ch, y0 : y0 + h, x0 : x0 + w]
            region *= inv
            region += a * value
    image = np.empty((CANVAS, CANVAS, 3), np.uint8)
    for ch in range(3):  # per-channel copy: much faster than a transposed copy
        image[:, :, ch] = np.rint(out[ch])
    return image


def _to_u8(arr: np.ndarray) -> np.ndarray:
    """Round to uint8; inputs are convex combinations of 0..255 values, so no clipping."""
    return np.rint(arr).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    return Image.fromarray(render_array(scene))


def layer_arrays(scene: Scene) -> np.ndarray:
    """(L, 128, 128, 4) uint8 RGBA layers, bottom (background) to top (word)."""
    items = _items(scene)
    layers = np.empty((1 + len(items), CANVAS, CANVAS, 4), np.uint8)
    layers[0] = _plain(scene.background, 255, "uint8")
    for i, (colour, (x0, y0, patch)) in enumerate(items, start=1):
        h, w = patch.shape
        layers[i] = _plain(colour, 0, "uint8")
        layers[i, y0 : y0 + h, x0 : x0 + w, 3] = patch
    return layers


def render_layers(scene: Scene) -> list[Image.Image]:
    return [Image.fromarray(layer) for layer in layer_arrays(scene)]


def composite_array(layers) -> np.ndarray:
    """Composite RGBA layers (arrays or images, bottom to top) with "over"; returns
    (H, W, 3) uint8. Whatever remains transparent is composited over black."""
    arrays = [np.asarray(layer) for layer in layers]
    if not arrays:
        raise InputError("composite needs at least one layer")
    for a in arrays:
        if a.ndim != 3 or a.shape[2] != 4 or a.shape[:2] != arrays[0].shape[:2]:
            raise InputError(f"layers must be same-size RGBA, got shape {a.shape}")
    rgb = np.zeros(arrays[0].shape[:2] + (3,), np.float32)
    acc = np.zeros(arrays[0].shape[:2] + (1,), np.float32)
    if arrays[0][..., 3].min() == 255:  # the usual opaque background
        rgb, acc, arrays = arrays[0][..., :3].astype(np.float32), acc + 1, arrays[1:]
    for a in arrays:
        src = a[..., :3].astype(np.float32)
        alpha = _alpha(a[..., 3:])
        if acc.min() >= 1:  # opaque below: same formula as render_array
            rgb = rgb * (np.float32(1) - alpha) + src * alpha
            continue
        new_acc = alpha + acc * (1 - alpha)
        rgb = np.where(new_acc > 0, (src * alpha + rgb * acc * (1 - alpha)) / np.maximum(new_acc, 1e-12), 0)
        acc = new_acc
    return _to_u8(rgb)


def composite(layers) -> Image.Image:
    return Image.fromarray(composite_array(layers))


