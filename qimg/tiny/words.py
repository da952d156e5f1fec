"""How near qimg-tiny is to drawing words before the checker reads any of them right: two measures that move
long before a word is legible.

- `word_rank`: in a generated picture, the drawn word's render distance to the true word, ranked among random
  words of its length (0: the true word is the closest, 0.5: chance).
- `word_gap`: the transformer's denoising error on a word's latent tokens with a random word of the same length in
  the prompt over the error with the true word (same scene, noise and sigma): 1.0 when the letters do not matter
  to the model, far above 1 for one that draws them.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from qimg.tiny import checker, world

RIVALS = 300
GAP_SIGMAS = (0.9,)


def word_like(text: str, rng: random.Random) -> str:
    """A random word of `text`'s length."""
    return "".join(rng.choice(world.LETTERS) for _ in text)


def rivals(text: str, n: int, seed: int) -> set[str]:
    """Up to `n` random words of `text`'s length other than it, the same for a given seed."""
    rng = random.Random(seed)
    return {word_like(text, rng) for _ in range(n)} - {text}


def word_rank(image, word: world.Word, n_rivals: int = RIVALS, seed: int = 0) -> float | None:
    """The share of `n_rivals` random words whose render is closer than `word`'s to the item the checker cuts from
    `word`'s cell of `image` (None when that cell holds under 10 inked pixels)."""
    ink = checker.cell_ink(image, word.cell)
    item = None if ink is None else ink[1]
    if item is None or (item >= 0.5).sum() < 10:
        return None
    mine = checker.render_distance(item, word.text, word.cell)
    theirs = np.array([checker.render_distance(item, r, word.cell) for r in rivals(word.text, n_rivals, seed)])
    return float((theirs < mine).mean())


def summarize_ranks(ranks: list[float | None]) -> dict:
    drawn = [r for r in ranks if r is not None]
    return {"word_scenes": len(ranks), "no_ink": len(ranks) - len(drawn),
            "mean_rank": float(np.mean(drawn)) if drawn else None,
            "median_rank": float(np.median(drawn)) if drawn else None,
            "true_word_closest": sum(r == 0.0 for r in drawn)}


def word_gap(pipe, scenes: list[world.Scene], sigmas=GAP_SIGMAS, seed: int = 0) -> dict:
    """Per sigma, the mean denoising error over the word tokens of the `scenes` that hold a word, with the true word
    and with a random one in the prompt, and their ratio (wrong / true). `pipe` is a loaded qimg-tiny pipeline."""
    from qimg.imaging import to_tensor
    from qimg.models.latents import pack
    from qimg.tiny.train import word_tokens

    scenes = [s for s in scenes if s.word is not None]
    if not scenes:
        raise ValueError("word_gap needs scenes with a word; none of the given scenes holds one")
    model, vae = pipe.transformer, pipe.vae
    rng = random.Random(seed)
    wrong = [world.Scene(s.background, s.objects, world.Word(word_like(s.word.text, rng), s.word.colour, s.word.cell))
             for s in scenes]
    rows = {}
    with torch.inference_mode():
        weight = next(vae.parameters())
        pixels = torch.cat([to_tensor(world.render(s), vae.image_channels) for s in scenes]).to(weight)
        latents = vae.normalize(vae.encode(pixels))
        x0, grid = pack(latents).float(), tuple(latents.shape[-2:])
        masks = [word_tokens(s).bool() for s in scenes]
        if masks[0].numel() != x0.shape[1]:
            raise ValueError(f"word_gap needs qimg-tiny's latent grid ({masks[0].numel()} tokens at 128x128); this "
                             f"model's VAE gives {x0.shape[1]}")
        prefixes = {kind: [model.encode_prefix(c.states, c.slot_mask, [], [], None, None)
                           for c in (pipe.condition(world.prompt(s)) for s in batch)]
                    for kind, batch in (("true", scenes), ("wrong", wrong))}  # the t=0 prefix holds for every sigma
        for sigma in sigmas:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
            xt = ((1 - sigma) * x0 + sigma * noise).to(model.dtype)
            errors = {kind: [] for kind in prefixes}
            for kind, batch_prefixes in prefixes.items():
                for i, prefix in enumerate(batch_prefixes):
                    v = model.denoise(xt[i:i + 1], torch.tensor([sigma]), prefix, grid).float()[0]
                    errors[kind].append((v - (noise[i] - x0[i])).pow(2).mean(-1)[masks[i]].mean().item())
            true, other = float(np.mean(errors["true"])), float(np.mean(errors["wrong"]))
            rows[str(sigma)] = {"true_error": true, "wrong_error": other, "ratio": other / true}
    return {"scenes": len(scenes), "sigmas": rows}
