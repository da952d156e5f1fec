"""The programmatic judge: perfect on ground truth, strict on wrong images."""

import itertools
import random
from dataclasses import replace

import numpy as np
import pytest

from qimg.tiny import checker as C
from qimg.tiny import world as W


def scenes(n, seed, word_prob=0.5):
    rng = random.Random(seed)
    return [W.random_scene(rng, word_prob=word_prob) for _ in range(n)]


def test_ground_truth_is_read_exactly():
    batch = scenes(600, seed=101, word_prob=0.5)
    failures = []
    for s in batch:
        result = C.score_t2i(W.render(s), s)
        if not result["exact"]:
            failures.append((W.prompt(s), result["detected"]))
    assert sum(s.word is not None for s in batch) > 250
    assert failures == []


def test_every_letter_in_every_cell_is_read():
    rng = random.Random(5)
    letters = W.LETTERS * 2
    words = [letters[i : i + 3] for i in range(0, 26, 3)] + [letters[i : i + 2] for i in range(1, 26, 2)]
    words += ["WMW", "III", "QJ", "MW", "IJ", "OQD", "DO", "QO"]
    for i, text in enumerate(words):
        cell = i % 9
        bg, colour = rng.sample(list(W.COLOURS), 2)
        obj_cell = (cell + 1 + i % 8) % 9
        s = W.Scene(bg, (W.Obj("circle", "small", colour, obj_cell),), W.Word(text, colour, cell))
        det = C.analyse(W.render_array(s))
        assert det.word == s.word, (text, det.word)


def test_detection_details():
    s = W.Scene(
        "yellow",
        (W.Obj("circle", "large", "red", 4), W.Obj("triangle", "small", "orange", 0), W.Obj("square", "large", "blue", 8)),
        W.Word("OK", "white", 7),
    )
    det = C.analyse(W.render(s))
    assert det.background == "yellow"
    assert det.as_scene() == s
    assert [c.kind for c in det.cells] == ["object", "empty", "empty", "empty", "object", "empty", "empty", "word", "object"]


def test_wrong_images_are_marked_wrong():
    s = W.Scene(
        "black",
        (W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "blue", 0)),
        W.Word("HI", "white", 7),
    )
    swapped = W.Scene("black", (replace(s.objects[0], colour="blue"), replace(s.objects[1], colour="red")), s.word)
    r = C.score_t2i(W.render(swapped), s)
    assert not r["exact"] and r["colour_accuracy"] == 0 and r["shape_accuracy"] == 1

    missing = W.Scene("black", s.objects[:1], s.word)
    r = C.score_t2i(W.render(missing), s)
    assert not r["exact"] and r["objects"][1]["position"] is False and r["objects"][0]["correct"]

    shape = W.Scene("black", (replace(s.objects[0], shape="triangle"), s.objects[1]), s.word)
    r = C.score_t2i(W.render(shape), s)
    assert not r["exact"] and r["objects"][0]["shape"] is False and r["objects"][0]["colour"]

    size = W.Scene("black", (replace(s.objects[0], size="small"), s.objects[1]), s.word)
    r = C.score_t2i(W.render(size), s)
    assert not r["exact"] and r["objects"][0]["size"] is False

    word = W.Scene("black", s.objects, W.Word("HO", "white", 7))
    r = C.score_t2i(W.render(word), s)
    assert not r["exact"] and r["word_exact"] is False and r["word_read"] == "HO" and r["object_accuracy"] == 1

    word_colour = W.Scene("black", s.objects, W.Word("HI", "green", 7))
    r = C.score_t2i(W.render(word_colour), s)
    assert not r["exact"] and r["word_exact"] and r["word_colour"] is False

    no_word = W.Scene("black", s.objects)
    r = C.score_t2i(W.render(no_word), s)
    assert not r["exact"] and r["word_exact"] is False

    moved = W.Scene("black", (replace(s.objects[0], cell=5), s.objects[1]), s.word)
    r = C.score_t2i(W.render(moved), s)
    assert not r["exact"] and r["objects"][0]["position"] is False and r["extra_cells"] == [5]

    background = W.Scene("green", s.objects, s.word)
    r = C.score_t2i(W.render(background), s)
    assert not r["exact"] and r["background"] is False and r["object_accuracy"] == 1

    blank = np.zeros((128, 128, 3), np.uint8)
    r = C.score_t2i(blank, s)
    assert not r["exact"] and r["object_accuracy"] == 0


def test_random_corruptions_are_caught():
    rng = random.Random(3)
    for s in scenes(150, seed=7):
        edit = W.random_edit_spec(s, rng)
        other = W.apply_edit(s, edit)
        assert not C.score_t2i(W.render_array(other), s)["exact"], (W.prompt(s), W.edit_instruction(edit))


def test_mild_noise_and_shift_are_tolerated():
    rng = np.random.default_rng(0)
    ok = 0
    batch = scenes(60, seed=11)
    for s in batch:
        img = W.render_array(s).astype(float)
        img = np.pad(img, ((1, 0), (0, 1), (0, 0)), mode="edge")[:128, 1:]  # 1 px shift
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        ok += C.score_t2i(img, s)["exact"]
    assert ok >= 0.95 * len(batch)


def test_render_distance_ranks_the_drawn_word_first():
    """A rendered word's ink, cut as the checker cuts a cell's item (the word-rank bench's cut), is closest to its
    own text: far nearer than every word of its length that differs in one letter."""
    rng = random.Random(5)
    for s in [s for s in scenes(80, seed=13) if s.word is not None][:12]:
        w = s.word
        colour, item = C.cell_ink(W.render_array(s), w.cell)
        assert colour == w.colour
        mine = C.render_distance(item, w.text, w.cell)
        assert mine < 10.0
        for _ in range(6):
            k = rng.randrange(len(w.text))
            other = w.text[:k] + rng.choice([c for c in W.LETTERS if c != w.text[k]]) + w.text[k + 1:]
            assert C.render_distance(item, other, w.cell) > mine + 5, (w.text, other)


# ----------------------------------------------------------------------------- edits


def test_score_edit_on_ground_truth():
    rng = random.Random(13)
    for s in scenes(120, seed=17):
        instruction, target = W.random_edit(s, rng)
        src, out = W.render_array(s), W.render_array(target)
        r = C.score_edit(src, out, s, target)
        assert r["satisfied"], instruction
        assert r["untouched_psnr"] == C.PSNR_CAP and r["untouched_pixels"] > 0, instruction
        unchanged = C.score_edit(src, src, s, target)
        assert not unchanged["satisfied"]


def test_score_edit_untouched_region():
    s = W.Scene("black", (W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "blue", 0)))
    target = W.apply_edit(s, W.parse_edit("move the red circle in the bottom right corner"))
    src, out = W.render_array(s), W.render_array(target)
    mask = C.untouched_mask(s, target)
    assert not mask[64, 64] and not mask[106, 106] and mask[20, 20] and mask[20, 106]
    damaged = out.copy()
    damaged[:20, 60:120] += 50  # dim grey haze over an untouched area: not an object
    r = C.score_edit(src, damaged, s, target)
    assert r["untouched_psnr"] < 25 and r["satisfied"]

    recolour_bg = W.apply_edit(s, W.parse_edit("change the background to white"))
    mask = C.untouched_mask(s, recolour_bg)
    assert mask[64, 64] and not mask[2, 100]  # object interiors only
    r = C.score_edit(src, W.render_array(recolour_bg), s, recolour_bg)
    assert r["satisfied"] and r["untouched_psnr"] == C.PSNR_CAP
    r = C.score_edit(src, W.render_array(W.Scene("white", (W.Obj("circle", "large", "green", 4), s.objects[1]))), s, recolour_bg)
    assert not r["satisfied"] and r["untouched_psnr"] < 15


# ----------------------------------------------------------------------------- layers


def test_score_layers_perfect_and_permuted():
    s = scenes(1, seed=19, word_prob=1.0)[0]
    true = W.render_layers(s)
    r = C.score_layers(true, true)
    assert r["mean_alpha_iou"] == pytest.approx(1) and r["rgb_l1"] == 0 and r["composite_psnr"] == C.PSNR_CAP
    order = list(range(len(true)))[::-1]
    r = C.score_layers([true[i] for i in order], true)
    assert r["mean_alpha_iou"] == pytest.approx(1)
    assert sorted((i, j) for i, j, _ in r["matches"]) == sorted((k, order[k]) for k in range(len(true)))


def test_score_layers_penalises_missing_and_wrong_layers():
    s = W.Scene("black", (W.Obj("circle", "large", "red", 4), W.Obj("square", "small", "blue", 0)), W.Word("OK", "white", 7))
    true = W.layer_arrays(s)
    r = C.score_layers(true[:-1], true)
    assert r["mean_alpha_iou"] == pytest.approx(3 / 4) and r["composite_psnr"] < 30
    recoloured = true.copy()
    recoloured[1, ..., :3] = W.COLOURS["green"]
    r = C.score_layers(recoloured, true)
    assert r["mean_alpha_iou"] == pytest.approx(1) and r["rgb_l1"] > 0.05
    shifted = true.copy()
    shifted[1] = np.roll(true[1], 5, axis=1)
    r = C.score_layers(shifted, true)
    assert 0.4 < r["mean_alpha_iou"] < 0.99


def test_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for n, m in [(1, 1), (3, 3), (4, 6), (6, 4), (5, 5), (2, 7)]:
        for _ in range(20):
            score = rng.random((n, m))
            pairs = C.assignment(score)
            assert len(pairs) == min(n, m)
            assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == min(n, m)
            if n <= m:
                best = max(sum(score[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
            else:
                best = max(sum(score[r, j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(n), m))
            assert sum(score[i, j] for i, j in pairs) == pytest.approx(best)


def test_psnr_and_inputs():
    a = np.zeros((128, 128, 3), np.uint8)
    assert C.psnr(a, a) == C.PSNR_CAP
    assert C.psnr(a, a + 255) == pytest.approx(0)
    with pytest.raises(ValueError, match="PSNR over an empty region"):
        C.psnr(a, a, np.zeros((128, 128), bool))
    with pytest.raises(ValueError, match="shape"):
        C.analyse(np.zeros((128, 128), np.uint8))
    big = np.asarray(W.render(scenes(1, seed=23)[0]).resize((256, 256)))
    assert C.analyse(big).background in W.COLOURS
