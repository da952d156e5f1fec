"""Edits (instructions, parsing, applying, sampling) and training batches."""

from __future__ import annotations

import random
import re
from dataclasses import replace

from qimg.errors import InputError
from qimg.tiny.world.language import (_SHAPE_LOOKUP, _SIZE_LOOKUP, POSITION_PHRASES, SHAPE_WORDS, SIZE_WORDS, _colour,
                                      _normalise, _strip_preposition, is_held_out, paraphrase, parse_position, prompt,
                                      random_train_scene)
from qimg.tiny.world.drawing import layer_arrays, render_array
from qimg.tiny.world.scene import (_WORD_RE, COLOURS, EDIT_KINDS, POSITIONS, SHAPES, SIZES, Edit, Obj, Scene,
                                   random_scene, random_word, validate)

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
