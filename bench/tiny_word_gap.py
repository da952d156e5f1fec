"""How much qimg-tiny's transformer reads the letters of a word: its denoising error on the word's latent tokens
with the true word in the prompt against a random word of the same length (same scene, noise and sigma).

    python bench/tiny_word_gap.py [[LABEL=]MODEL ...] [--scenes 48] [--sigmas 0.3,0.5,0.7,0.9]

Held-out scenes with a word (`world.held_out(400, seed=0)`), rendered and encoded by the model's own VAE; at each
sigma the flow-matching velocity error (mean square per channel) over the tokens the word's pixels touch. A ratio
wrong / true of 1.0 means the letters do not matter to the model; a model that draws words reads them far above 1.
The error itself is what its sampler cannot recover of the word. Prints a table and writes
bench/results/tiny_word_gap.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

import qimg
from qimg.imaging import to_tensor
from qimg.models.latents import pack
from qimg.tiny import world
from qimg.tiny.train import word_tokens


def word_gap(pipe, n_scenes: int, sigmas: list[float]) -> dict:
    model, vae = pipe.transformer, pipe.vae
    scenes = [s for s in world.held_out(400, seed=0) if s.word is not None][:n_scenes]
    rng = random.Random(0)
    wrong = [world.Scene(s.background, s.objects,
                         world.Word("".join(rng.choice(world.LETTERS) for _ in s.word.text), s.word.colour,
                                    s.word.cell)) for s in scenes]
    rows = {}
    with torch.inference_mode():
        pixels = torch.cat([to_tensor(world.render(s), vae.image_channels) for s in scenes])
        latents = vae.normalize(vae.encode(pixels))
        x0, grid = pack(latents).float(), tuple(latents.shape[-2:])
        masks = [word_tokens(s).bool() for s in scenes]
        prefixes = {kind: [model.encode_prefix(c.states.float(), c.slot_mask, [], [], None, None)
                           for c in (pipe.condition(world.prompt(s)) for s in batch)]
                    for kind, batch in (("true", scenes), ("wrong", wrong))}  # the t=0 prefix holds for every sigma
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
            xt = (1 - sigma) * x0 + sigma * noise
            errors = {kind: [] for kind in prefixes}
            for kind, batch_prefixes in prefixes.items():
                for i, prefix in enumerate(batch_prefixes):
                    v = model.denoise(xt[i:i + 1], torch.tensor([sigma]), prefix, grid).float()[0]
                    errors[kind].append((v - (noise[i] - x0[i])).pow(2).mean(-1)[masks[i]].mean().item())
            true, other = float(np.mean(errors["true"])), float(np.mean(errors["wrong"]))
            rows[str(sigma)] = {"true_error": true, "wrong_error": other, "ratio": other / true}
    return {"scenes": len(scenes), "sigmas": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["qimg-tiny"],
                        help="model names or folders, each optionally LABEL=MODEL (the label names its row)")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--sigmas", default="0.3,0.5,0.7,0.9")
    args = parser.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    results = {}
    print(f"{'model':<28} " + " ".join(f"{'s=' + str(s) + ' true/wrong/ratio':>28}" for s in sigmas))
    for spec in args.models:
        name, _, folder = spec.rpartition("=")
        name = name or folder
        r = results[name] = word_gap(qimg.load(folder, device="cpu", dtype="float32"), args.scenes, sigmas)
        print(f"{name:<28} " + " ".join(f"{v['true_error']:>10.4f} {v['wrong_error']:>8.4f} {v['ratio']:>8.3f}"
                                        for v in r["sigmas"].values()))
    out = Path(__file__).parent / "results" / "tiny_word_gap.json"
    out.write_text(json.dumps({"models": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
