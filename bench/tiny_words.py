"""How near qimg-tiny's models are to drawing words, before the checker reads any of them right
(`qimg.tiny.words`: the drawn word's rank among random words, the transformer's word-token error gap).

    python bench/tiny_words.py [[LABEL=]MODEL ...] [--n 200] [--sigmas 0.3,0.5,0.7,0.9] [--no-pictures]

The `qimg tiny eval` scenes and seeds: for each held-out scene with a word, the picture is generated at the model's
defaults and the item in the word's cell (cut as the checker cuts it) is ranked by render distance among 300 random
words of its length (0: the true word is the closest, 0.5: chance); and at each sigma, the denoising error on the
word's latent tokens with a random word in the prompt over that with the true word (1.0: the letters do not
matter). Prints a table and writes bench/results/tiny_words.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import qimg
from qimg.tiny import checker, world, words


def measure(pipe, n: int, sigmas: list[float], pictures: bool) -> dict:
    scenes = world.held_out(n, seed=0)
    out = {"word_gap": words.word_gap(pipe, scenes, sigmas)}
    if pictures:
        ranks = [words.word_rank(checker.to_array(pipe.generate(world.prompt(s), seed=i)[0]), s.word, seed=i)
                 for i, s in enumerate(scenes) if s.word is not None]
        out["word_rank"] = {**words.summarize_ranks(ranks), "ranks": ranks}
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["qimg-tiny"],
                        help="model names or folders, each optionally LABEL=MODEL (the label names its row)")
    parser.add_argument("--n", type=int, default=200, help="held-out scenes (about 30%% hold a word)")
    parser.add_argument("--sigmas", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--no-pictures", action="store_true", help="only the error gap (no sampling)")
    args = parser.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    results = {}
    print(f"{'model':<28} {'mean rank':>9} {'closest':>7} {'no ink':>6} "
          + " ".join(f"{'gap@' + str(s):>8}" for s in sigmas))
    for spec in args.models:
        label, _, folder = spec.rpartition("=")
        r = results[label or folder] = measure(qimg.load(folder, device="cpu", dtype="float32"), args.n, sigmas,
                                               not args.no_pictures)
        rank = r.get("word_rank", {})
        print(f"{label or folder:<28} {fmt(rank.get('mean_rank'), '9.3f'):>9} "
              f"{fmt(rank.get('true_word_closest'), 'd'):>7} {fmt(rank.get('no_ink'), 'd'):>6} "
              + " ".join(f"{v['ratio']:>8.3f}" for v in r["word_gap"]["sigmas"].values()))
    out = Path(__file__).parent / "results" / "tiny_words.json"
    out.write_text(json.dumps({"held_out_scenes": args.n, "models": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
