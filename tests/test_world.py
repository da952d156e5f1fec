"""The tiny world: grammar, rendering, layers, edits, splits and batches."""

import random

import numpy as np
import pytest
from PIL import Image

from qimg.tiny import world as W


def scenes(n, seed=0, word_prob=0.5):
    rng = random.Random(seed)
    return [W.random_scene(rng, word_prob=word_prob) for _ in range(n)]


# ----------------------------------------------------------------------------- grammar


def test_constants():
    assert W.CANVAS == 128
    assert set(W.COLOURS) == {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}
    assert W.SHAPES == ("circle", "square", "triangle")
    assert set(W.SIZES) == {"small", "large"}
    assert [W.POSITIONS[i] for i in range(9)][:3] == ["in the top left corner", "at the top", "in the top right corner"]
    rgb = np.array(list(W.COLOURS.values()), float)
    dists = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert dists.min() > 80  # clearly separable


def test_random_scenes_follow_the_grammar():
    for s in scenes(2000, seed=1):
        W.validate(s)
        assert 1 <= len(s.objects) <= 3
        assert all(o.colour != s.background for o in s.objects)
        cells = [o.cell for o in s.objects] + ([s.word.cell] if s.word else [])
        assert len(cells) == len(set(cells))
        if s.word:
            assert s.word.colour != s.background and 2 <= len(s.word.text) <= 3


def test_random_scene_counts_and_determinism():
    assert scenes(50, seed=3) == scenes(50, seed=3)
    assert [W.prompt(s) for s in scenes(50, seed=3)] == [W.prompt(s) for s in scenes(50, seed=3)]
    assert scenes(50, seed=3) != scenes(50, seed=4)
    rng = random.Random(0)
    assert all(len(W.random_scene(rng, n_objects=2).objects) == 2 for _ in range(20))
    assert all(W.random_scene(rng, word_prob=1.0).word for _ in range(20))
    assert not any(W.random_scene(rng, word_prob=0.0).word for _ in range(20))
    with pytest.raises(ValueError, match="n_objects"):
        W.random_scene(rng, n_objects=4)


def test_validate_rejects_bad_scenes():
    obj = W.Obj("circle", "large", "red", 4)
    with pytest.raises(ValueError, match="background colour"):
        W.validate(W.Scene("red", (obj,)))
    with pytest.raises(ValueError, match="share a cell"):
        W.validate(W.Scene("blue", (obj, W.Obj("square", "small", "green", 4))))
    with pytest.raises(ValueError, match="occupied"):
        W.validate(W.Scene("blue", (obj,), W.Word("OK", "white", 4)))
    with pytest.raises(ValueError, match="'OKAY'"):
        W.validate(W.Scene("blue", (obj,), W.Word("OKAY", "white", 0)))
    with pytest.raises(ValueError, match="1-3 objects"):
        W.validate(W.Scene("blue", ()))


def test_scene_equality_ignores_object_order():
    a, b = W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "blue", 0)
    assert W.Scene("yellow", (a, b)) == W.Scene("yellow", (b, a))
    assert hash(W.Scene("yellow", (a, b))) == hash(W.Scene("yellow", (b, a)))
    assert W.Scene("yellow", (a, b)).canonical().objects == (b, a)


# ----------------------------------------------------------------------------- prompts


def test_example_prompt():
    text = 'a large red circle in the center and a small blue square in the top left corner on a yellow background, with the word "OK" in white at the bottom'
    scene = W.Scene(
        "yellow",
        (W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "blue", 0)),
        W.Word("OK", "white", 7),
    )
    assert W.prompt(scene) == text
    assert W.parse_prompt(text) == scene
    three = W.Scene("black", scene.objects + (W.Obj("triangle", "small", "green", 8),))
    assert W.prompt(three).startswith("a large red circle in the center, a small blue square in the top left corner and a small")


def test_canonical_prompts_and_paraphrases_parse_back():
    rng = random.Random(7)
    for s in scenes(1000, seed=5):
        parsed = W.parse_prompt(W.prompt(s))
        assert parsed == s and parsed.objects == s.objects  # canonical keeps the order
        text = W.paraphrase(s, rng)
        assert W.parse_prompt(text) == s, text


def test_paraphrases_vary():
    rng = random.Random(0)
    s = scenes(1, seed=9, word_prob=1.0)[0]
    texts = {W.paraphrase(s, rng) for _ in range(50)}
    assert len(texts) > 20
    joined = " ".join(W.paraphrase(x, rng) for x in scenes(300, seed=2))
    for word in ("big", "tiny", "box", "picture of", "image of", "centre"):
        assert word in joined


@pytest.mark.parametrize(
    "text, part",
    [
        ("a large pink circle in the center on a yellow background", "pink"),
        ("a huge red circle in the center on a yellow background", "huge"),
        ("a large red blob in the center on a yellow background", "blob"),
        ("a large red circle in the attic on a yellow background", "in the attic"),
        ("a large red circle in the center", "background"),
        ('a large red circle in the center on a yellow background, with the word "OKAY" in white at the top', "OKAY"),
        ("a large red circle in the center on a red background", "background colour"),
        ("a large red circle in the center and a small blue square in the center on a white background", "share a cell"),
    ],
)
def test_parse_errors_name_the_part(text, part):
    with pytest.raises(ValueError, match=part):
        W.parse_prompt(text)


# ----------------------------------------------------------------------------- rendering


def test_render_shapes_and_types():
    s = scenes(1, seed=11, word_prob=1.0)[0]
    img = W.render(s)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (128, 128)
    arr = W.render_array(s)
    assert arr.dtype == np.uint8 and arr.shape == (128, 128, 3)
    assert np.array_equal(np.asarray(img), arr)
    assert np.array_equal(W.render_array(s), arr)  # deterministic


def test_layers_composite_to_the_render():
    for s in scenes(300, seed=13, word_prob=0.6):
        layers = W.render_layers(s)
        assert len(layers) == 1 + len(s.objects) + (s.word is not None)
        assert all(layer.mode == "RGBA" and layer.size == (128, 128) for layer in layers)
        alphas = [np.asarray(layer)[..., 3] for layer in layers]
        assert alphas[0].min() == 255
        shapes = [o.shape for o in s.objects] + ["word"] * (s.word is not None)
        for a, shape in zip(alphas[1:], shapes):
            assert a.max() == 255
            if shape != "square":  # squares may sit exactly on the pixel grid
                assert ((a > 0) & (a < 255)).any()  # antialiased
        diff = np.abs(np.asarray(W.composite(layers), int) - W.render_array(s))
        assert diff.max() <= 1


def test_items_stay_inside_their_cells():
    for s in scenes(200, seed=17, word_prob=1.0):
        layers = W.layer_arrays(s)
        cells = [o.cell for o in s.objects] + [s.word.cell]
        for layer, cell in zip(layers[1:], cells):
            x0, y0, x1, y1 = W.cell_box(cell)
            inside = np.zeros((128, 128), bool)
            inside[y0:y1, x0:x1] = True
            assert layer[..., 3][~inside].max() == 0


def test_sizes_and_word_height():
    def extent(scene):
        a = W.layer_arrays(scene)[1][..., 3] >= 128
        rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
        return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1

    for shape in W.SHAPES:
        for size, px in W.SIZES.items():
            h, w = extent(W.Scene("white", (W.Obj(shape, size, "red", 4),)))
            assert abs(max(h, w) - px) <= 1
    h, w = extent(W.Scene("white", (W.Obj("circle", "small", "red", 0),)))
    word = W.layer_arrays(W.Scene("white", (W.Obj("circle", "small", "red", 0),), W.Word("HEX", "black", 4)))[2]
    rows = np.flatnonzero((word[..., 3] >= 128).any(1))
    assert 19 <= rows[-1] - rows[0] + 1 <= 21  # capitals about 20 px tall
    wide = W.layer_arrays(W.Scene("white", (W.Obj("circle", "small", "red", 0),), W.Word("WMW", "black", 4)))[2]
    cols = np.flatnonzero((wide[..., 3] > 0).any(0))
    assert cols[-1] - cols[0] + 1 <= W.WORD_MAX_W_PX + 1


def test_composite_general_alpha():
    bottom = np.zeros((4, 4, 4), np.uint8)
    bottom[..., 0], bottom[..., 3] = 200, 128
    top = np.zeros((4, 4, 4), np.uint8)
    top[..., 2], top[..., 3] = 100, 255
    assert np.asarray(W.composite([bottom, top]))[0, 0].tolist() == [0, 0, 100]
    assert np.asarray(W.composite([bottom]))[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(ValueError, match="composite needs at least one layer"):
        W.composite([])


# ----------------------------------------------------------------------------- edits


def test_canonical_edit_forms():
    s = W.Scene("yellow", (W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "blue", 0)), W.Word("OK", "white", 7))
    cases = {
        "make the red circle green": W.Scene("yellow", (W.Obj("circle", "large", "green", 4), s.objects[1]), s.word),
        "move the red circle in the top right corner": W.Scene("yellow", (W.Obj("circle", "large", "red", 2), s.objects[1]), s.word),
        "remove the blue square": W.Scene("yellow", s.objects[:1], s.word),
        "add a small black triangle on the left": W.Scene("yellow", s.objects + (W.Obj("triangle", "small", "black", 3),), s.word),
        "change the background to purple": W.Scene("purple", s.objects, s.word),
        'change the word to "HI"': W.Scene("yellow", s.objects, W.Word("HI", "white", 7)),
    }
    for text, target in cases.items():
        edit = W.parse_edit(text)
        assert W.edit_instruction(edit) == text
        assert W.apply_edit(s, edit) == target
    assert W.parse_edit("move the red circle to the top right corner") == W.parse_edit("move the red circle in the top right corner")


def test_random_edits_round_trip_and_render():
    rng = random.Random(23)
    seen = set()
    for s in scenes(600, seed=29):
        edit = W.random_edit_spec(s, rng)
        instruction, target = W.edit_instruction(edit), W.apply_edit(s, edit)
        assert W.parse_edit(instruction) == edit
        assert W.apply_edit(s, W.parse_edit(W.paraphrase_edit(edit, rng))) == target
        assert target != s
        W.validate(target)
        assert W.render_array(target).shape == (128, 128, 3)
        seen.add(edit.kind)
    assert seen == set(W.EDIT_KINDS)


def test_random_edit_by_kind():
    rng = random.Random(31)
    for kind in W.EDIT_KINDS:
        for s in scenes(100, seed=37, word_prob=1.0):
            if not W.edit_possible(s, kind):
                with pytest.raises(ValueError, match=f"no valid '{kind}' edit for scene"):
                    W.random_edit(s, rng, kind=kind)
                continue
            instruction, target = W.random_edit(s, rng, kind=kind)
            assert W.parse_edit(instruction).kind == kind
            assert W.apply_edit(s, W.parse_edit(instruction)) == target


@pytest.mark.parametrize(
    "instruction, message",
    [
        ("make the red circle yellow", "background"),  # yellow is the background
        ("make the green circle blue", "0 objects"),
        ("make the red square blue", "2 objects"),  # two red squares: ambiguous
        ("move the red circle at the bottom", "occupied"),  # the word is there
        ("add a small red circle in the center", "occupied"),
        ("change the background to red", "background red"),
        ('change the word to "OK"', "already"),
    ],
)
def test_invalid_edits_raise(instruction, message):
    s = W.Scene(
        "yellow",
        (W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "red", 0), W.Obj("square", "large", "red", 2)),
        W.Word("OK", "white", 7),
    )
    with pytest.raises(ValueError, match=message):
        W.apply_edit(s, W.parse_edit(instruction))


def test_edit_parse_errors():
    for bad, message in (("dance the red circle", "could not parse edit instruction"),
                         ("make the red blob blue", "unknown shape 'blob'"),
                         ("move the red circle to the moon", "unknown position 'to the moon'"),
                         ('change the word to "ok"', "word 'ok' is not 2-3 uppercase letters")):
        with pytest.raises(ValueError, match=message):
            W.parse_edit(bad)
    with pytest.raises(ValueError, match="only object"):
        W.apply_edit(W.Scene("white", (W.Obj("circle", "small", "red", 0),)), W.parse_edit("remove the red circle"))
    with pytest.raises(ValueError, match="no word"):
        W.apply_edit(W.Scene("white", (W.Obj("circle", "small", "red", 0),)), W.parse_edit('change the word to "AB"'))


# ----------------------------------------------------------------------------- splits and batches


def test_held_out_split():
    pool = scenes(4000, seed=41)
    frac = sum(map(W.is_held_out, pool)) / len(pool)
    assert 0.03 < frac < 0.07
    for s in pool[:200]:
        reordered = W.Scene(s.background, tuple(reversed(s.objects)), s.word)
        assert W.is_held_out(reordered) == W.is_held_out(s)
    evals = W.held_out(20, seed=1)
    assert evals == W.held_out(20, seed=1) and len(set(evals)) == 20
    assert all(map(W.is_held_out, evals))


def test_batches():
    t2i = W.batch(random.Random(0), 40, "t2i")
    assert all(x["image"].shape == (128, 128, 3) and x["image"].dtype == np.uint8 for x in t2i)
    assert all(W.parse_prompt(x["prompt"]) == x["scene"] and not W.is_held_out(x["scene"]) for x in t2i)
    edits = W.batch(random.Random(0), 40, "edit")
    for x in edits:
        assert W.apply_edit(x["source_scene"], W.parse_edit(x["instruction"])) == x["target_scene"]
        assert np.array_equal(x["target"], W.render_array(x["target_scene"]))
        assert not W.is_held_out(x["source_scene"]) and not W.is_held_out(x["target_scene"])
    layers = W.batch(random.Random(0), 40, "layers")
    for x in layers:
        assert x["layers"].dtype == np.uint8 and x["layers"].shape[1:] == (128, 128, 4)
        assert np.array_equal(W.composite_array(x["layers"]), x["image"])
    again = W.batch(random.Random(0), 40, "t2i")
    assert [x["prompt"] for x in again] == [x["prompt"] for x in t2i]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(again, t2i))
    with pytest.raises(ValueError, match="task"):
        W.batch(random.Random(0), 1, "video")
