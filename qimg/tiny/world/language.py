"""Prompts: the canonical text of a scene, paraphrases, and parsing text back into a scene."""

from __future__ import annotations

import hashlib
import random
import re

from qimg.errors import InputError
from qimg.tiny.world.scene import (_WORD_RE, ALL_COLOURS, COLOURS, HELD_OUT_PERCENT, POSITIONS, Obj, Scene, Word,
                                   random_scene, validate)

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
    if word not in (ALL_COLOURS if what != "background" else COLOURS):
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


# ----------------------------------------------------------------------------- the held-out split


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
