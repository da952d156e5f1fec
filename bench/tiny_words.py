"""How near qimg-tiny's models are to drawing words, before the checker reads any of them right
(`qimg.tiny.words`: the drawn word's rank among random words, the transformer's word-token error gap).

    python bench/tiny_words.py [[LABEL=]MODEL ...] [--n 200] [--sigmas 0.3,0.5,0.7,0.9] [--no-pictures]
                               [--pool WORK/pool.pt]

The `qimg tiny eval` scenes and seeds: for each held-out scene with a word, the picture is generated at the model's
defaults and the item in the word's cell (cut as the checker cuts it) is ranked by render distance among 300 random
words of its length (0: the true word is the closest, 0.5: chance); and at each sigma, the denoising error on the
word's latent tokens with a random word in the prompt over that with the true word (1.0: the letters do not
matter). With `--pool`, the gap is also measured on as many of a training run's pool scenes with a word (the
scenes the model was trained on): a gap far above the held-out one would mean the model memorises its words.
Prints a table and writes bench/results/tiny_words.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import qimg
from qimg.tiny import checker, world, words


def pool_word_scenes(path: Path, n: int) -> list:
    import torch

    pairs = torch.load(path, weights_only=False)["pairs"]
    return [src for src, _, _ in pairs if src.word is not None][:n]


def measure(pipe, n: int, sigmas: list[float], pictures: bool, pool: list | None) -> dict:
    scenes = world.held_out(n, seed=0)
    out = {"word_gap": words.word_gap(pipe, scenes, sigmas)}
    if pool:
        out["pool_word_gap"] = words.word_gap(pipe, pool, sigmas)
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
    parser.add_argument("--pool", type=Path, help="a training work folder's pool.pt: the gap on its word scenes too")
    args = parser.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    results = {}
    held_words = sum(s.word is not None for s in world.held_out(args.n, seed=0))
    pool = pool_word_scenes(args.pool, held_words) if args.pool else None
    print(f"{'model':<28} {'mean rank':>9} {'closest':>7} {'no ink':>6} "
          + " ".join(f"{'gap@' + str(s):>8}" for s in sigmas))
    for spec in args.models:
        label, _, folder = spec.rpartition("=")
        r = results[label or folder] = measure(qimg.load(folder, device="cpu", dtype="float32"), args.n, sigmas,
                                               not args.no_pictures, pool)
        rank = r.get("word_rank", {})
        print(f"{label or folder:<28} {fmt(rank.get('mean_rank'), '9.3f'):>9} "
              f"{fmt(rank.get('true_word_closest'), 'd'):>7} {fmt(rank.get('no_ink'), 'd'):>6} "
              + " ".join(f"{v['ratio']:>8.3f}" for v in r["word_gap"]["sigmas"].values()))
        if pool:
            print(f"{'  on ' + str(len(pool)) + ' pool scenes':<28} {'':>9} {'':>7} {'':>6} "
                  + " ".join(f"{v['ratio']:>8.3f}" for v in r["pool_word_gap"]["sigmas"].values()))
    out = Path(__file__).parent / "results" / "tiny_words.json"
    out.write_text(json.dumps({"held_out_scenes": args.n, "pool": str(args.pool) if args.pool else None,
                               "models": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
