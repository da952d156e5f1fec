"""How close qimg-tiny's drawn words are to legible, before the checker reads any of them right.

    python bench/tiny_word_rank.py [[LABEL=]MODEL ...] [--n 200] [--others 300]

For each held-out scene with a word (the `qimg tiny eval` scenes and seeds), the soft alpha of the item in the
word's cell is cut from the generated picture as the checker cuts it (`checker.cell_ink`), and the true word's
render distance (the checker's aligned L1) is ranked among `--others` random words of the same length: rank 0
means the true word is the closest, 0.5 is chance. Prints a row per model and writes bench/results/tiny_word_rank.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

import qimg
from qimg.tiny import checker, world


def word_ranks(pipe, n: int, others: int) -> dict:
    ranks, closest, inkless = [], 0, 0  # ranks: one per word scene, None where no ink was drawn
    for i, scene in enumerate(world.held_out(n, seed=0)):
        if scene.word is None:
            continue
        img = checker.to_array(pipe.generate(world.prompt(scene), seed=i)[0])
        ink = checker.cell_ink(img, scene.word.cell)
        item = None if ink is None else ink[1]
        if item is None or (item >= 0.5).sum() < 10:
            inkless += 1
            ranks.append(None)
            continue
        text = scene.word.text
        rng = random.Random(i)  # the same rivals for every model
        rivals = {"".join(rng.choice(world.LETTERS) for _ in text) for _ in range(others)} - {text}
        mine = checker.render_distance(item, text, scene.word.cell)
        theirs = np.array([checker.render_distance(item, r, scene.word.cell) for r in rivals])
        ranks.append(float((theirs < mine).mean()))
        closest += bool((theirs >= mine).all())
    drawn = [r for r in ranks if r is not None]
    return {"word_scenes": len(ranks), "no_ink": inkless, "mean_rank": float(np.mean(drawn)),
            "median_rank": float(np.median(drawn)), "true_word_closest": closest, "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["qimg-tiny"],
                        help="model names or folders, each optionally LABEL=MODEL (the label names its row)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--others", type=int, default=300)
    args = parser.parse_args()
    rows = {}
    print(f"{'model':<40} {'words':>5} {'no ink':>6} {'mean rank':>9} {'median':>7} {'closest':>7}")
    for spec in args.models:
        name, _, model = spec.rpartition("=")
        name = name or model
        r = rows[name] = word_ranks(qimg.load(model), args.n, args.others)
        print(f"{name:<40} {r['word_scenes']:>5} {r['no_ink']:>6} {r['mean_rank']:>9.3f} {r['median_rank']:>7.3f} "
              f"{r['true_word_closest']:>7}")
    out = Path(__file__).parent / "results" / "tiny_word_rank.json"
    out.write_text(json.dumps({"held_out_scenes": args.n, "others": args.others, "models": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
