"""The word-progress measures of `qimg.tiny.words` and their place in `qimg tiny eval`."""

import json
import random

import pytest

from qimg.tiny import checker, world, words
from qimg.tiny.eval import compare


def picture(word: world.Word | None, background: str = "white"):
    return checker.to_array(world.render(world.Scene(background, (), word)))


def test_the_true_render_ranks_first_and_other_words_rank_lower():
    rng = random.Random(3)
    true_ranks, other_ranks = [], []
    for _ in range(6):
        length, cell = rng.choice([2, 3]), rng.randrange(9)
        text, other = ("".join(rng.choice(world.LETTERS) for _ in range(length)) for _ in range(2))
        word = world.Word(text, "purple", cell)
        true_ranks.append(words.word_rank(picture(word), word, n_rivals=100))
        other_ranks.append(words.word_rank(picture(world.Word(other, "purple", cell)), word, n_rivals=100))
    assert true_ranks == [0.0] * 6
    assert sum(other_ranks) / 6 > 0.2, other_ranks  # chance is 0.5; a wrong word is rarely the closest


def test_an_empty_cell_has_no_rank_and_rivals_are_fixed_by_seed():
    assert words.word_rank(picture(None), world.Word("WO", "purple", 0)) is None
    a, b = words.rivals("ABC", 50, seed=7), words.rivals("ABC", 50, seed=7)
    assert a == b and "ABC" not in a and all(len(r) == 3 and r.isupper() for r in a)
    assert words.rivals("ABC", 50, seed=8) != a
    summary = words.summarize_ranks([0.0, 0.5, None, 0.25])
    assert summary == {"word_scenes": 4, "no_ink": 1, "mean_rank": 0.25, "median_rank": 0.25, "true_word_closest": 1}


def test_word_gap_needs_word_scenes():
    with pytest.raises(ValueError, match="none of the given scenes holds one"):
        words.word_gap(None, [s for s in world.held_out(10) if s.word is None])


def test_compare_counts_drawn_words_nearer_and_farther():
    def t2i(ranks):
        return {"t2i": {"scenes": [{"prompt": f"p{i}", "exact": False, **({} if r is None else {"word_rank": r})}
                                   for i, r in enumerate(ranks)]}}
    c = compare(t2i([0.1, 0.4, None, 0.3, 0.2]), t2i([0.2, 0.3, 0.1, 0.3, 0.5]))
    assert c["word_rank"] == {"n": 4, "nearer": 2, "farther": 1, "sign_test_p": 1.0}
    assert "word_rank" not in compare(t2i([None]), t2i([0.1]))


def test_eval_records_word_ranks_and_the_error_gap(tmp_path, capsys):
    from qimg.cli import main

    scenes = world.held_out(8)
    assert scenes[7].word is not None and all(s.word is None for s in scenes[:7])
    assert main(["tiny", "eval", "--n", "8", "--steps", "2", "--tasks", "t2i", "--quiet", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "eval.json").read_text())
    rows = data["t2i"]["scenes"]
    assert ["word_rank" in r for r in rows] == [False] * 7 + [True]
    rank = data["t2i"]["word_rank"]
    assert rank["word_scenes"] == 1 and rank["no_ink"] + (rank["mean_rank"] is not None) == 1
    gap = data["word_gap"]
    assert gap["scenes"] == 1 and set(gap["sigmas"]) == {"0.9"}
    row = gap["sigmas"]["0.9"]
    assert row["ratio"] == pytest.approx(row["wrong_error"] / row["true_error"]) and row["true_error"] > 0
    assert "word-token error, a random word over the true one (1 scenes)" in capsys.readouterr().out
