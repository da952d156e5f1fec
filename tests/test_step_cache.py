"""Step caches: the first-block cache's decisions on constructed residuals; threshold 0 gives the uncached picture
bit for bit (2.x with its prefix KV cache, an edit, v1, Layered); a working threshold skips calls and stays close;
the counts reach the progress events, the PNG metadata, the CLI and the HTTP API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qimg
from qimg.errors import InputError
from qimg.models.hooks import BlockStep
from qimg.options import GenerateOptions
from qimg.sampling.caches import CacheSpec, FirstBlockCache, parse_cache


def psnr(a, b) -> float:
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(10 * np.log10(255**2 / max((d**2).mean(), 1e-12)))


@pytest.mark.parametrize("text,spec", [("fbcache", CacheSpec("fbcache", 0.2)), ("FBCache:0.05", CacheSpec("fbcache",
                                       0.05)), (None, None), ("none", None), ("", None)])
def test_parse(text, spec):
    assert parse_cache(text) == spec


@pytest.mark.parametrize("text,message", [("teacache", "cache must be one of"), ("fbcache:x", "must be a number"),
                                          ("fbcache:2", r"must be in \[0, 1\]"), (3, "must be a string")])
def test_parse_refusals(text, message):
    with pytest.raises(InputError, match=message):
        parse_cache(text)
    with pytest.raises(InputError, match=message):
        GenerateOptions(prompt="x", cache=text)


def run_model(cache, x, first_change, branch="cond", step=0, blocks=3):
    """A 'model' of `blocks` blocks: block 0 adds `first_change`, the others add 1 each; returns the output."""
    where = BlockStep(step, branch, torch.tensor(0.5))
    calls = []

    def block(index):
        def run(state):
            calls.append(index)
            return state + (first_change if index == 0 else 1.0)
        return run

    state = x
    for index in range(blocks):
        state = cache.hook(where, index, state, block(index))
    return state, calls


def test_first_block_cache_decisions():
    cache = FirstBlockCache(CacheSpec("fbcache", 0.1, warmup=2, max_skips=2))
    x = torch.zeros(4)
    out, calls = run_model(cache, x, torch.full((4,), 1.0))
    assert calls == [0, 1, 2] and torch.equal(out, torch.full((4,), 3.0))  # warm-up: full
    out, calls = run_model(cache, x, torch.full((4,), 1.0), step=1)
    assert calls == [0, 1, 2]  # still warming up (2 calls)
    out, calls = run_model(cache, x, torch.full((4,), 1.05), step=2)  # residual changed 5% < 10%: skip
    assert calls == [0] and torch.allclose(out, torch.full((4,), 1.05 + 2.0))  # first block + the cached residual
    out, calls = run_model(cache, x, torch.full((4,), 1.06), step=3)
    assert calls == [0]  # second skip in a row
    out, calls = run_model(cache, x, torch.full((4,), 1.07), step=4)
    assert calls == [0, 1, 2]  # max_skips reached: computed in full
    out, calls = run_model(cache, x, torch.full((4,), 1.5), step=5)
    assert calls == [0, 1, 2]  # a large change: full
    assert cache.skipped == 2 and cache.calls == 6
    other, calls = run_model(cache, x, torch.full((4,), 1.5), branch="uncond")
    assert calls == [0, 1, 2]  # each guidance branch keeps its own state and warm-up


def test_threshold_zero_is_the_uncached_picture(ref21, ref_v1):
    from PIL import Image

    _, folder = ref21
    pipe = qimg.load(folder, dtype="float32")
    kw = dict(width=64, height=64, steps=4, seed=2)
    for extra in ({}, {"cfg": 3.0}, {"images": [Image.new("RGB", (64, 64), (200, 30, 30))]}):
        plain = pipe.generate("a red circle", **kw, **extra)[0]
        zero = pipe.generate("a red circle", **kw, **extra, cache="fbcache:0")[0]
        assert plain.tobytes() == zero.tobytes()
        assert zero.info["qimg"]["cache_skipped"] == 0 and zero.info["qimg"]["cache"] == "fbcache:0"
    v1 = qimg.load(ref_v1["t2i"][1], dtype="float32")
    a = v1.generate("a cat", width=64, height=64, steps=4, seed=1, cfg=1)[0]
    b = v1.generate("a cat", width=64, height=64, steps=4, seed=1, cfg=1, cache="fbcache:0")[0]
    assert a.tobytes() == b.tobytes()


def test_layered_with_a_cache(ref_layered):
    from PIL import Image

    _, folder = ref_layered
    pipe = qimg.load(folder, dtype="float32", task="layers")
    image = Image.new("RGB", (64, 64), (20, 160, 40))
    kw = dict(layers=2, resolution=64, steps=6, seed=1, prompt="a green square")
    plain = pipe.layers(image, **kw)
    zero = pipe.layers(image, **kw, cache="fbcache:0")
    assert all(p.tobytes() == z.tobytes() for p, z in zip(plain, zero))
    cached = pipe.layers(image, **kw, cache="fbcache:1")
    assert cached[0].info["qimg"]["cache_skipped"] > 0


def test_the_embedded_model_skips_and_stays_close():
    pipe = qimg.load()
    prompt = "a large red circle in the center on a blue background"
    events = []
    plain = pipe.generate(prompt, seed=1, steps=30)[0]
    cached = pipe.generate(prompt, seed=1, steps=30, cache="fbcache", progress=events.append)[0]
    meta = cached.info["qimg"]
    assert meta["model_calls"] == 60 and meta["cache_skipped"] >= 20  # cfg 2: two branches x 30 steps
    assert psnr(plain, cached) > 30
    assert [e.skipped for e in events if e.stage == "denoise"][-1] == meta["cache_skipped"]


def test_cli_and_api_take_a_cache(ref21, tmp_path):
    from PIL import Image

    from qimg.cli import main

    _, folder = ref21
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(folder), "--size", "64x64", "--steps", "6", "--seed", "1",
                 "--dtype", "float32", "--cache", "fbcache:1", "-o", str(out), "--quiet"]) == 0
    import json

    meta = json.loads(Image.open(out).text["qimg"])
    assert meta["cache"] == "fbcache:1" and meta["cache_skipped"] > 0
    from qimg.serve.requests import GenerationRequest, validate

    req = validate(GenerationRequest, {"prompt": "x", "cache": "fbcache:0.1"}, strict=True)
    assert req.sampling(None)["cache"] == "fbcache:0.1"


def test_guidance_in_one_batch_gives_the_same_pictures(ref21):
    """Both guidance branches as one transformer call (the default where the family can) give the pictures of two
    calls bit for bit, also for an edit."""
    from PIL import Image

    _, folder = ref21
    one = qimg.load(folder, dtype="float32")
    two = qimg.load(folder, dtype="float32", batch_guidance=False)
    assert one.batch_guidance and not two.batch_guidance
    for extra in ({}, {"images": [Image.new("RGB", (64, 64), (200, 30, 30))]}):
        kw = dict(width=64, height=64, steps=3, seed=4, cfg=3.0, negative_prompt="blurry", **extra)
        assert one.generate("a red circle", **kw)[0].tobytes() == two.generate("a red circle", **kw)[0].tobytes()


def test_magnitude_cache_decisions():
    """magcache skips whole calls while the estimated error from the residual's magnitude ratio stays small."""
    from qimg.sampling.caches import MagnitudeCache

    cache = MagnitudeCache(CacheSpec("magcache", 0.1, warmup=2, max_skips=2))
    x = torch.zeros(4)
    runs = [run_model(cache, x, torch.full((4,), change), step=step)
            for step, change in enumerate([1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0])]
    # warm-up twice; equal residual norms (ratio 1): skip, skip; the cap of 2 skips: full (a larger residual);
    # the ratio jumped (7/3): full; equal again: skip
    assert [len(calls) for _, calls in runs] == [3, 3, 0, 0, 3, 3, 0]
    assert torch.equal(runs[2][0], torch.full((4,), 3.0))  # a skipped call: its input + the last residual
    assert torch.equal(runs[6][0], torch.full((4,), 7.0))
    assert cache.skipped == 3 and cache.calls == 7


def test_magnitude_cache_threshold_zero_and_a_working_threshold(ref21):
    _, folder = ref21
    pipe = qimg.load(folder, dtype="float32")
    kw = dict(width=64, height=64, steps=12, seed=2, cfg=3.0)
    plain = pipe.generate("a red circle", **kw)[0]
    assert pipe.generate("a red circle", **kw, cache="magcache:0")[0].tobytes() == plain.tobytes()
    cached = pipe.generate("a red circle", **kw, cache="magcache:0.5")[0]
    assert cached.info["qimg"]["cache_skipped"] > 0 and psnr(plain, cached) > 20
