"""The procedurally generated world the tiny qimg models are trained on.

Public contract (prompts, edits and renders depend on it; do not change lightly):

* Canvas 128x128, a plain background in one of eight palette colours.
* 1-3 objects: a shape (circle, square, triangle), a size (small ~22 px, large
  ~40 px on the longest side), a colour (never the background colour), centred
  in one of the nine cells of a 3x3 grid, at most one object per cell.
* Optionally a word of 2-3 uppercase letters, DejaVu Sans Bold, capitals 20 px
  tall, in one colour (not the background colour), centred in a free cell.
  Letters are laid out on their ink boxes with a fixed 3 px gap and squeezed
  horizontally when the word would be wider than 40 px, so a word always fits
  its cell and never touches a neighbour.
* Canonical prompt::

    a large red circle in the center and a small blue square in the top left
    corner on a yellow background, with the word "OK" in white at the bottom

* Canonical edits: ``make the {colour} {shape} {colour2}``, ``move the {colour}
  {shape} {position}``, ``remove the {colour} {shape}``, ``add a {size}
  {colour} {shape} {position}``, ``change the background to {colour}``,
  ``change the word to "{WORD}"``.
* Layers: background (opaque), then each object in scene order, then the word;
  compositing them with "over" gives exactly the rendered image.

Rendering is 4x4 supersampled (analytic shapes, FreeType glyphs) and cached per
(shape, size, cell) / (word, cell), so a scene renders in well under 1 ms.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qimg.errors import InputError

CANVAS = 128
SS = 4  # supersampling factor
CELL = CANVAS / 3

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (25, 160, 50),
    "blue": (25, 65, 225),
    "yellow": (250, 225, 30),
    "orange": (255, 135, 0),
    "purple": (135, 40, 175),
    "white": (250, 250, 250),
    "black": (12, 12, 12),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 22, "large": 40}
POSITIONS: dict[int, str] = {
    0: "in the top left corner",
    1: "at the top",
    2: "in the top right corner",
    3: "on the left",
    4: "in the center",
    5: "on the right",
    6: "in the bottom left corner",
    7: "at the bottom",
    8: "in the bottom right corner",
}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FONT_PATH = Path(__file__).parent / "fonts" / "DejaVuSans-Bold.ttf"
CAP_PX = 20  # capital height in output pixels
WORD_GAP_PX = 3  # gap between letter ink boxes
WORD_MAX_W_PX = 40  # words wider than this are squeezed horizontally
HELD_OUT_PERCENT = 5
EDIT_KINDS: tuple[str, ...] = ("recolour", "move", "remove", "add", "background", "word")
_WORD_RE = re.compile(r"^[A-Z]{2,3}$")


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Obj:
    shape: str
    size: str
    colour: str
    cell: int


@dataclass(frozen=True)
class Word:
    text: str
    colour: str
    cell: int


@dataclass(frozen=True, eq=False)
class Scene:
    """A scene. Object order is the layer / prompt order; equality ignores it."""

    background: str
    objects: tuple[Obj, ...]
    word: Word | None = None

    def key(self) -> tuple:
        return (self.background, tuple(sorted(self.objects, key=_obj_key)), self.word)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scene) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())

    def canonical(self) -> "Scene":
        """The same scene with objects sorted by cell."""
        return Scene(self.background, self.key()[1], self.word)

    def occupied(self) -> set[int]:
        cells = {o.cell for o in self.objects}
        return cells | ({self.word.cell} if self.word else set())

    def free_cells(self) -> list[int]:
        return [c for c in range(9) if c not in self.occupied()]


@dataclass(frozen=True)
class Edit:
    """A parsed edit. ``colour``/``shape`` name the object referred to (for
    recolour/move/remove) or the new object (add, with ``size`` and ``cell``)."""

    kind: str
    colour: str | None = None
    shape: str | None = None
    new_colour: str | None = None
    size: str | None = None
    cell: int | None = None
    text: str | None = None


def _obj_key(o: Obj) -> tuple:
    return (o.cell, o.shape, o.size, o.colour)


def validate(scene: Scene) -> Scene:
    """Check a scene against the grammar; raise InputError naming the problem."""
    if scene.background not in COLOURS:
        raise InputError(f"unknown background colour {scene.background!r}")
    if not 1 <= len(scene.objects) <= 3:
        raise InputError(f"a scene has 1-3 objects, got {len(scene.objects)}")
    for o in scene.objects:
        _validate_obj(o, scene.background)
    cells = [o.cell for o in scene.objects]
    if len(set(cells)) != len(cells):
        raise InputError(f"two objects share a cell: cells {cells}")
    if scene.word is not None:
        _validate_word(scene.word, scene.background, cells)
    return scene


def _validate_obj(o: Obj, background: str) -> None:
    if o.shape not in SHAPES:
        raise InputError(f"unknown shape {o.shape!r}")
    if o.size not in SIZES:
        raise InputError(f"unknown size {o.size!r}")
    if o.colour not in COLOURS:
        raise InputError(f"unknown colour {o.colour!r}")
    if o.colour == background:
        raise InputError(f"object {o.colour} {o.shape} has the background colour")
    if o.cell not in POSITIONS:
        raise InputError(f"cell {o.cell!r} is not in 0..8")


def _validate_word(w: Word, background: str, object_cells: list[int]) -> None:
    if not _WORD_RE.match(w.text):
        raise InputError(f"word {w.text!r} is not 2-3 uppercase letters A-Z")
    if w.colour not in COLOURS:
        raise InputError(f"unknown word colour {w.colour!r}")
    if w.colour == background:
        raise InputError(f"word colour {w.colour} is the background colour")
    if w.cell not in POSITIONS:
        raise InputError(f"word cell {w.cell!r} is not in 0..8")
    if w.cell in object_cells:
        raise InputError(f"word cell {w.cell} is occupied by an object")


# ----------------------------------------------------------------------------- sampling


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.choice((2, 3))))


def random_scene(rng: random.Random, n_objects: int | None = None, word_prob: float = 0.3) -> Scene:
    """A uniformly random valid scene (objects in random order)."""
    n = rng.randint(1, 3) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise InputError(f"n_objects must be 1-3, got {n}")
    background = rng.choice(list(COLOURS))
    others = [c for c in COLOURS if c != background]
    has_word = rng.random() < word_prob
    cells = rng.sample(range(9), n + has_word)
    objects = tuple(
        Obj(rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(others), cell) for cell in cells[:n]
    )
    word = Word(random_word(rng), rng.choice(others), cells[n]) if has_word else None
    return Scene(background, objects, word)


def is_held_out(scene: Scene) -> bool:
    """Deterministic ~5% split by hashing the order-independent canonical prompt."""
    digest = hashlib.sha256(prompt(scene.canonical()).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def held_out(n: int, seed: int = 0, word_prob: float = 0.3) -> list[Scene]:
    """``n`` distinct held-out scenes, deterministic in ``seed`` (for evaluation)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        s = random_scene(rng, word_prob=word_prob)
        if is_held_out(s) and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def random_train_scene(rng: random.Random, word_prob: float = 0.3) -> Scene:
    """A random scene that is not held out."""
    while True:
        s = random_scene(rng, word_prob=word_prob)
        if not is_held_out(s):
            return s


# ----------------------------------------------------------------------------- rendering


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
    return tuple(np.float32(v) for v in COLOURS[colour])


@lru_cache(maxsize=None)
def _plain(colour: str, alpha: int, dtype: str) -> np.ndarray:
    """A read-only full canvas of one colour: (3, H, W) float32, or (H, W, 4) uint8 RGBA."""
    if dtype == "float32":
        arr = np.stack([np.full((CANVAS, CANVAS), v, np.float32) for v in _rgb(colour)])
    else:
        arr = np.tile(np.asarray((*COLOURS[colour], alpha), np.uint8), (CANVAS, CANVAS, 1))
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


# ----------------------------------------------------------------------------- prompts

SIZE_WORDS = {"small": ["small", "tiny", "little"], "large": ["large", "big"]}
SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"]}
POSITION_PHRASES: dict[int, list[str]] = {
    0: [POSITIONS[0], "in the upper left corner", "at the top left", "in the top-left corner"],
    1: [POSITIONS[1], "at the top center", "at the top centre", "in the top middle"],
    2: [POSITIONS[2], "in the upper right corner", "at the top right", "in the top-right corner"],
    3: [POSITIONS[3], "on the left side", "at the left"],
    4: [POSITIONS[4], "in the centre", "in the middle", "at the center"],
    5: [POSITIONS[5], "on the right side", "at the right"],
    6: [POSITIONS[6], "in the lower left corner", "at the bottom left", "in the bottom-left corner"],
    7: [POSITIONS[7], "at the bottom center", "at the bottom centre", "in the bottom middle"],
    8: [POSITIONS[8], "in the lower right corner", "at the bottom right", "in the bottom-right corner"],
}
PREPOSITIONS = ("into", "in", "at", "on", "to")
PREFIXES = ["", "a picture of ", "an image of ", "a drawing of ", "an illustration of "]
_SIZE_LOOKUP = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_SHAPE_LOOKUP = {w: s for s, ws in SHAPE_WORDS.items() for w in ws} | {"disk": "circle"}


def _strip_preposition(phrase: str) -> str:
    first, _, rest = phrase.partition(" ")
    return rest if first in PREPOSITIONS and rest else phrase


_CORE_POSITIONS = {_strip_preposition(p): c for c, ps in POSITION_PHRASES.items() for p in ps}


def object_phrase(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.shape} {POSITIONS[o.cell]}"


def join_phrases(parts: list[str], oxford: bool = False) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + (", and " if oxford else " and ") + parts[-1]


def word_clause(w: Word) -> str:
    return f', with the word "{w.text}" in {w.colour} {POSITIONS[w.cell]}'


def prompt(scene: Scene) -> str:
    """The canonical prompt (objects in scene order). Per the contract the article is
    always "a" ("on a orange background"); parsers accept "an" too."""
    text = join_phrases([object_phrase(o) for o in scene.objects])
    text += f" on a {scene.background} background"
    return text + (word_clause(scene.word) if scene.word else "")


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A random paraphrase that ``parse_prompt`` maps back to ``scene``."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    body = join_phrases([_para_object(o, rng) for o in objs], oxford=rng.random() < 0.3)
    bg = f"{'an' if scene.background[0] in 'aeiou' else 'a'} {scene.background} background"
    if rng.random() < 0.2:
        text = f"{bg} with {body}"
    else:
        text = rng.choice(PREFIXES) + body + rng.choice([f" on {bg}", f" against {bg}"])
    if scene.word:
        text += _para_word(scene.word, rng)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.2 else "")


def _para_object(o: Obj, rng: random.Random) -> str:
    size, shape = rng.choice(SIZE_WORDS[o.size]), rng.choice(SHAPE_WORDS[o.shape])
    return f"a {size} {o.colour} {shape} {rng.choice(POSITION_PHRASES[o.cell])}"


def _para_word(w: Word, rng: random.Random) -> str:
    pos = rng.choice(POSITION_PHRASES[w.cell])
    lead = rng.choice([", with the word", ", with the text", " and the word", ", and the text"])
    tail = rng.choice([f"in {w.colour} {pos}", f"written in {w.colour} {pos}", f"{pos} in {w.colour}"])
    return f'{lead} "{w.text}" {tail}'


def _normalise(text: str) -> str:
    """Lower-case outside quotes, collapse spaces, drop a trailing full stop."""
    pieces = text.strip().rstrip(".").strip().split('"')
    pieces = [p if i % 2 else p.lower() for i, p in enumerate(pieces)]
    return re.sub(r"\s+", " ", '"'.join(pieces))


_WORD_CLAUSE = re.compile(r'(?:,\s*and|,\s*with|\s+and|\s+with)\s+the\s+(?:word|text)\s+"([^"]*)"\s*(.*)$')
_PREFIX_RE = re.compile(r"^(?:" + "|".join(p.strip() for p in PREFIXES if p) + r")\s+")
_BG_TAIL = re.compile(r"^(.*?)\s+(?:on|against)\s+an?\s+(\w+)\s+background$")
_BG_HEAD = re.compile(r"^an?\s+(\w+)\s+background\s+with\s+(.*)$")
_SPLIT = re.compile(r",\s*and\s+|,\s*|\s+and\s+")


def parse_prompt(text: str) -> Scene:
    """Parse a canonical prompt or paraphrase; InputError names the failing part."""
    norm = _normalise(text)
    word_m = _WORD_CLAUSE.search(norm)
    main = norm[: word_m.start()] if word_m else norm
    if '"' in main:
        raise InputError(f"could not parse the word clause in {text!r}")
    background, body = _parse_background(main)
    objects = tuple(_parse_object(p) for p in _SPLIT.split(body))
    word = _parse_word(word_m.group(1), word_m.group(2)) if word_m else None
    return validate(Scene(_colour(background, "background"), objects, word))


def _parse_background(main: str) -> tuple[str, str]:
    main = _PREFIX_RE.sub("", main)
    head = _BG_HEAD.match(main)
    if head:
        return head.group(1), head.group(2)
    tail = _BG_TAIL.match(main)
    if tail:
        return tail.group(2), _PREFIX_RE.sub("", tail.group(1))
    raise InputError(f"could not find 'on a <colour> background' in {main!r}")


def _colour(word: str, what: str) -> str:
    if word not in COLOURS:
        raise InputError(f"unknown {what} colour {word!r}")
    return word


def _parse_object(phrase: str) -> Obj:
    tokens = phrase.strip().split(" ")
    if len(tokens) < 5 or tokens[0] not in ("a", "an", "one"):
        raise InputError(f"could not parse object {phrase!r}: expected 'a <size> <colour> <shape> <position>'")
    if tokens[1] not in _SIZE_LOOKUP:
        raise InputError(f"could not parse object {phrase!r}: unknown size {tokens[1]!r}")
    if tokens[3] not in _SHAPE_LOOKUP:
        raise InputError(f"could not parse object {phrase!r}: unknown shape {tokens[3]!r}")
    colour = _colour(tokens[2], f"object {phrase!r}:")
    return Obj(_SHAPE_LOOKUP[tokens[3]], _SIZE_LOOKUP[tokens[1]], colour, parse_position(" ".join(tokens[4:])))


def parse_position(phrase: str) -> int:
    """Cell index of a position phrase (any preposition, canonical or synonym)."""
    core = _strip_preposition(phrase.strip())
    if core not in _CORE_POSITIONS:
        raise InputError(f"unknown position {phrase!r}")
    return _CORE_POSITIONS[core]


def _parse_word(text: str, tail: str) -> Word:
    if not _WORD_RE.match(text):
        raise InputError(f"word {text!r} is not 2-3 uppercase letters A-Z")
    tail = re.sub(r"^written\s+", "", tail.strip())
    m = re.match(r"^in (\w+) (.+)$", tail)
    if m and m.group(1) != "the":
        return Word(text, _colour(m.group(1), "word"), parse_position(m.group(2)))
    m = re.match(r"^(.+) in (\w+)$", tail)
    if m:
        return Word(text, _colour(m.group(2), "word"), parse_position(m.group(1)))
    raise InputError(f"could not parse word colour/position {tail!r}")


# ----------------------------------------------------------------------------- edits


def edit_instruction(edit: Edit) -> str:
    """The canonical instruction for an edit."""
    k = edit.kind
    if k == "recolour":
        return f"make the {edit.colour} {edit.shape} {edit.new_colour}"
    if k == "move":
        return f"move the {edit.colour} {edit.shape} {POSITIONS[edit.cell]}"
    if k == "remove":
        return f"remove the {edit.colour} {edit.shape}"
    if k == "add":
        return f"add a {edit.size} {edit.colour} {edit.shape} {POSITIONS[edit.cell]}"
    if k == "background":
        return f"change the background to {edit.new_colour}"
    if k == "word":
        return f'change the word to "{edit.text}"'
    raise InputError(f"unknown edit kind {k!r}")


def paraphrase_edit(edit: Edit, rng: random.Random) -> str:
    """A random paraphrase of an edit instruction that ``parse_edit`` accepts."""
    k, ref = edit.kind, f"the {edit.colour} {rng.choice(SHAPE_WORDS.get(edit.shape, ['?']))}"
    if k == "recolour":
        return f"{rng.choice(['make', 'turn', 'paint', 'colour'])} {ref} {edit.new_colour}"
    if k == "move":
        pos = _strip_preposition(rng.choice(POSITION_PHRASES[edit.cell]))
        return f"{rng.choice(['move', 'put', 'place'])} {ref} {rng.choice(['to', 'in', 'into'])} {pos}"
    if k == "remove":
        return f"{rng.choice(['remove', 'delete', 'erase'])} {ref}"
    if k == "add":
        size, shape = rng.choice(SIZE_WORDS[edit.size]), rng.choice(SHAPE_WORDS[edit.shape])
        return f"add a {size} {edit.colour} {shape} {rng.choice(POSITION_PHRASES[edit.cell])}"
    if k == "background":
        return rng.choice([f"change the background to {edit.new_colour}", f"make the background {edit.new_colour}"])
    return rng.choice([f'change the word to "{edit.text}"', f'change the text to "{edit.text}"'])


_EDIT_PATTERNS = [
    ("background", re.compile(r"^(?:change|make|set|turn) the background (?:to |into )?(\w+)$")),
    ("word", re.compile(r'^(?:change|replace) the (?:word|text) (?:to|with) "([^"]*)"$')),
    ("remove", re.compile(r"^(?:remove|delete|erase) the (\w+) (\w+)$")),
    ("add", re.compile(r"^add (?:a|an|one) (\w+) (\w+) (\w+) (.+)$")),
    ("move", re.compile(r"^(?:move|put|place) the (\w+) (\w+) (.+)$")),
    ("recolour", re.compile(r"^(?:make|turn|paint|colour|color) the (\w+) (\w+) (\w+)$")),
]


def parse_edit(instruction: str) -> Edit:
    """Parse an edit instruction (canonical or paraphrase) into an Edit."""
    norm = _normalise(instruction)
    for kind, pattern in _EDIT_PATTERNS:
        m = pattern.match(norm)
        if m:
            return _edit_from_match(kind, m.groups(), instruction)
    raise InputError(f"could not parse edit instruction {instruction!r}")


def _ref_shape(word: str, instruction: str) -> str:
    if word not in _SHAPE_LOOKUP:
        raise InputError(f"unknown shape {word!r} in edit {instruction!r}")
    return _SHAPE_LOOKUP[word]


def _edit_from_match(kind: str, g: tuple, instruction: str) -> Edit:
    if kind == "background":
        return Edit(kind, new_colour=_colour(g[0], "background"))
    if kind == "word":
        if not _WORD_RE.match(g[0]):
            raise InputError(f"word {g[0]!r} is not 2-3 uppercase letters A-Z")
        return Edit(kind, text=g[0])
    colour, shape = _colour(g[0 if kind != "add" else 1], "object"), None
    if kind == "add":
        if g[0] not in _SIZE_LOOKUP:
            raise InputError(f"unknown size {g[0]!r} in edit {instruction!r}")
        shape = _ref_shape(g[2], instruction)
        return Edit(kind, colour=colour, shape=shape, size=_SIZE_LOOKUP[g[0]], cell=parse_position(g[3]))
    shape = _ref_shape(g[1], instruction)
    if kind == "remove":
        return Edit(kind, colour=colour, shape=shape)
    if kind == "move":
        return Edit(kind, colour=colour, shape=shape, cell=parse_position(g[2]))
    return Edit(kind, colour=colour, shape=shape, new_colour=_colour(g[2], "new"))


def find_object(scene: Scene, colour: str, shape: str) -> int:
    """Index of the unique object with this colour and shape; InputError otherwise."""
    hits = [i for i, o in enumerate(scene.objects) if o.colour == colour and o.shape == shape]
    if len(hits) != 1:
        raise InputError(f"{len(hits)} objects are {colour} {shape}s; an edit needs exactly one")
    return hits[0]


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after ``edit``; InputError if the edit is ambiguous or invalid."""
    k, objs = edit.kind, list(scene.objects)
    if k == "background":
        used = {o.colour for o in objs} | ({scene.word.colour} if scene.word else set())
        if edit.new_colour == scene.background or edit.new_colour in used:
            raise InputError(f"background {edit.new_colour} is the current background or used by an item")
        return validate(replace(scene, background=edit.new_colour))
    if k == "word":
        if scene.word is None:
            raise InputError("the scene has no word to change")
        if edit.text == scene.word.text:
            raise InputError(f"the word is already {edit.text!r}")
        return validate(replace(scene, word=replace(scene.word, text=edit.text)))
    if k == "add":
        if edit.cell in scene.occupied():
            raise InputError(f"cannot add into occupied cell {edit.cell}")
        objs.append(Obj(edit.shape, edit.size, edit.colour, edit.cell))
        return validate(replace(scene, objects=tuple(objs)))
    return _apply_object_edit(scene, edit, objs)


def _apply_object_edit(scene: Scene, edit: Edit, objs: list[Obj]) -> Scene:
    i = find_object(scene, edit.colour, edit.shape)
    if edit.kind == "remove":
        if len(objs) == 1:
            raise InputError("cannot remove the only object")
        del objs[i]
    elif edit.kind == "move":
        if edit.cell in scene.occupied():
            raise InputError(f"cannot move into occupied cell {edit.cell}")
        objs[i] = replace(objs[i], cell=edit.cell)
    elif edit.kind == "recolour":
        if edit.new_colour == objs[i].colour:
            raise InputError(f"the {edit.colour} {edit.shape} is already {edit.new_colour}")
        objs[i] = replace(objs[i], colour=edit.new_colour)
    else:
        raise InputError(f"unknown edit kind {edit.kind!r}")
    return validate(replace(scene, objects=tuple(objs)))


def valid_edits(scene: Scene, kind: str) -> list[Edit]:
    """Every valid, unambiguous edit of one kind (except word edits, which are sampled)."""
    objs, free, unique = scene.objects, scene.free_cells(), _unique_objects(scene)
    if kind == "recolour":
        return [
            Edit(kind, o.colour, o.shape, new_colour=c)
            for o in unique
            for c in COLOURS
            if c not in (o.colour, scene.background)
        ]
    if kind == "move":
        return [Edit(kind, o.colour, o.shape, cell=c) for o in unique for c in free]
    if kind == "remove":
        return [Edit(kind, o.colour, o.shape) for o in unique] if len(objs) > 1 else []
    if kind == "add":
        if len(objs) >= 3:
            return []
        others = [c for c in COLOURS if c != scene.background]
        return [Edit(kind, c, s, size=z, cell=cell) for cell in free for s in SHAPES for z in SIZES for c in others]
    if kind == "background":
        used = {o.colour for o in objs} | ({scene.word.colour} if scene.word else set()) | {scene.background}
        return [Edit(kind, new_colour=c) for c in COLOURS if c not in used]
    if kind == "word":
        return [Edit(kind, text="?")] if scene.word else []
    raise InputError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")


def _unique_objects(scene: Scene) -> list[Obj]:
    objs = scene.objects
    return [o for o in objs if sum(p.colour == o.colour and p.shape == o.shape for p in objs) == 1]


def edit_possible(scene: Scene, kind: str) -> bool:
    """Cheap test that ``valid_edits(scene, kind)`` is non-empty."""
    unique, free = _unique_objects(scene), scene.free_cells()
    used = {o.colour for o in scene.objects} | ({scene.word.colour} if scene.word else set())
    checks = {
        "recolour": bool(unique),
        "move": bool(unique and free),
        "remove": bool(unique) and len(scene.objects) > 1,
        "add": len(scene.objects) < 3 and bool(free),
        "background": len(used | {scene.background}) < len(COLOURS),
        "word": scene.word is not None,
    }
    if kind not in checks:
        raise InputError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    return checks[kind]


def random_edit_spec(scene: Scene, rng: random.Random, kind: str | None = None) -> Edit:
    """A random valid Edit for ``scene`` (of ``kind`` if given; else a uniformly
    random possible kind)."""
    kinds = [kind] if kind else [k for k in EDIT_KINDS if edit_possible(scene, k)]
    options = valid_edits(scene, rng.choice(kinds))
    if not options:
        raise InputError(f"no valid {kind!r} edit for scene {prompt(scene)!r}")
    edit = rng.choice(options)
    if edit.kind == "word":
        text = scene.word.text
        while text == scene.word.text:
            text = random_word(rng)
        edit = replace(edit, text=text)
    return edit


def random_edit(scene: Scene, rng: random.Random, kind: str | None = None) -> tuple[str, Scene]:
    """(canonical instruction, target scene) for a random valid edit."""
    edit = random_edit_spec(scene, rng, kind)
    return edit_instruction(edit), apply_edit(scene, edit)


# ----------------------------------------------------------------------------- batches


def batch(
    rng: random.Random,
    n: int,
    task: str = "t2i",
    paraphrase_prob: float = 0.5,
    word_prob: float = 0.3,
    exclude_held_out: bool = True,
) -> list[dict]:
    """Training samples with uint8 numpy images.

    * t2i: prompt, image (128,128,3), scene
    * edit: instruction, source, target (images), source_scene, target_scene, source_prompt
    * layers: prompt, image, layers (L,128,128,4; background first), scene
    Held-out scenes (and edits touching one) are skipped unless exclude_held_out=False.
    """
    makers = {"t2i": _t2i_sample, "edit": _edit_sample, "layers": _layers_sample}
    if task not in makers:
        raise InputError(f"unknown task {task!r}; expected one of {sorted(makers)}")
    out = []
    while len(out) < n:
        sample = makers[task](rng, paraphrase_prob, word_prob, exclude_held_out)
        if sample is not None:
            out.append(sample)
    return out


def _sample_scene(rng: random.Random, word_prob: float, exclude: bool) -> Scene:
    return random_train_scene(rng, word_prob) if exclude else random_scene(rng, word_prob=word_prob)


def _text(scene: Scene, rng: random.Random, p: float) -> str:
    return paraphrase(scene, rng) if rng.random() < p else prompt(scene)


def _t2i_sample(rng, p, word_prob, exclude) -> dict:
    scene = _sample_scene(rng, word_prob, exclude)
    return {"prompt": _text(scene, rng, p), "image": render_array(scene), "scene": scene}


def _layers_sample(rng, p, word_prob, exclude) -> dict:
    scene = _sample_scene(rng, word_prob, exclude)
    layers = layer_arrays(scene)
    return {"prompt": _text(scene, rng, p), "image": render_array(scene), "layers": layers, "scene": scene}


def _edit_sample(rng, p, word_prob, exclude) -> dict | None:
    source = _sample_scene(rng, word_prob, exclude)
    edit = random_edit_spec(source, rng)
    target = apply_edit(source, edit)
    if exclude and is_held_out(target):
        return None
    instruction = paraphrase_edit(edit, rng) if rng.random() < p else edit_instruction(edit)
    return {
        "instruction": instruction,
        "source": render_array(source),
        "target": render_array(target),
        "source_scene": source,
        "target_scene": target,
        "source_prompt": prompt(source),
        "edit": edit,
    }
