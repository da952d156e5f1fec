"""The world's vocabulary and scenes: colours, shapes, sizes, cells, words; validation and random scenes."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

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
# Colours the world can draw and name but never puts in a random scene: the shipped models never saw them, so they
# are new words to teach (a LoRA's test, `bench/lora_concept.py`). Objects and words only, not backgrounds.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"azure": (120, 170, 250)}
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}
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
FONT_PATH = Path(__file__).parent.parent / "fonts" / "DejaVuSans-Bold.ttf"
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
    if o.colour not in ALL_COLOURS:
        raise InputError(f"unknown colour {o.colour!r}")
    if o.colour == background:
        raise InputError(f"object {o.colour} {o.shape} has the background colour")
    if o.cell not in POSITIONS:
        raise InputError(f"cell {o.cell!r} is not in 0..8")


def _validate_word(w: Word, background: str, object_cells: list[int]) -> None:
    if not _WORD_RE.match(w.text):
        raise InputError(f"word {w.text!r} is not 2-3 uppercase letters A-Z")
    if w.colour not in ALL_COLOURS:
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


