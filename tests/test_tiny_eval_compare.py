import math

import pytest

from qimg.errors import InputError
from qimg.tiny.eval import compare, sign_test


def rows(verdicts, key="prompt", passed="exact"):
    return {"scenes": [{key: f"scene {i}", passed: v} for i, v in enumerate(verdicts)]}


def test_compare_counts_wins_and_losses_scene_by_scene():
    ours = {"t2i": rows([1, 1, 0, 0, 1]), "edit": rows([0, 1, 1], "instruction", "satisfied")}
    theirs = {"t2i": rows([1, 0, 1, 0, 0]), "edit": rows([0, 1, 0], "instruction", "satisfied")}
    c = compare(ours, theirs)
    assert (c["t2i"]["both"], c["t2i"]["only_ours"], c["t2i"]["only_theirs"], c["t2i"]["n"]) == (1, 2, 1, 5)
    assert (c["edit"]["both"], c["edit"]["only_ours"], c["edit"]["only_theirs"]) == (1, 1, 0)
    assert compare({"t2i": rows([1])}, {"edit": rows([1], "instruction", "satisfied")}) == {}


def test_compare_refuses_other_scenes_or_old_files():
    with pytest.raises(InputError, match="did not see the same scenes"):
        compare({"t2i": rows([1, 0])}, {"t2i": rows([1, 0, 1])})
    with pytest.raises(InputError, match="without per-scene rows"):
        compare({"t2i": rows([1])}, {"t2i": {"exact": 1.0}})


def test_sign_test_matches_the_binomial_tails():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 2 ** 10)
    assert sign_test(2, 8) == sign_test(8, 2) == pytest.approx(2 * sum(math.comb(10, i) for i in range(3)) / 1024)
    assert sign_test(30, 12) < 0.01 < sign_test(24, 18)
