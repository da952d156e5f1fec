"""`qimg tiny eval`: score the tiny models on held-out scenes with the programmatic checker."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qimg.atomic import atomic_write
from qimg.tiny import checker, words, world


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def by_objects(values: list, scenes) -> dict:
    """The mean of `values` over the scenes with 1, 2 and 3 objects (None where there are none)."""
    return {str(n): mean(v for v, s in zip(values, scenes) if len(s.objects) == n) for n in (1, 2, 3)}


def ticking(items, progress, task: str):
    """`items`, calling `progress(task, done, total)` after each one."""
    for i, item in enumerate(items):
        yield item
        if progress is not None:
            progress(task, i + 1, len(items))


def eval_t2i(pipe, scenes, sampling: dict, progress=None) -> tuple[dict, list]:
    rows, samples, seconds, ranks = [], [], [], []
    for i, scene in enumerate(ticking(scenes, progress, "t2i")):
        text = world.prompt(scene)
        start = time.perf_counter()
        image = pipe.generate(text, seed=i, **sampling)[0]
        seconds.append(time.perf_counter() - start)
        score = checker.score_t2i(image, scene)
        rows.append(score)
        samples.append((image, text, score["exact"]))
        ranks.append(None if scene.word is None else words.word_rank(image, scene.word, seed=i))
    objects = [o for r in rows for o in r["objects"]]
    by_count = by_objects([r["exact"] for r in rows], scenes)
    return {
        "n": len(rows),
        "exact": mean(r["exact"] for r in rows),
        "exact_by_objects": by_count,
        "colour": mean(o["colour"] for o in objects),
        "shape": mean(o["shape"] for o in objects),
        "size": mean(o["size"] for o in objects),
        "position": mean(o["position"] for o in objects),
        "shape_by_kind": shapes_by_kind(rows, scenes),
        "background": mean(r["background"] for r in rows),
        "word_exact": mean(r["word_exact"] for r in rows),
        "words": sum(r["word_exact"] is not None for r in rows),
        "word_rank": words.summarize_ranks([r for r, s in zip(ranks, scenes) if s.word is not None]),
        "seconds_per_image": mean(seconds),
        "scenes": [{"prompt": text, "exact": r["exact"], "detected": r["detected"], "word_read": r["word_read"],
                    "objects": [{k: o[k] for k in ("cell", "colour", "shape", "size", "position", "read_as")}
                                for o in r["objects"]],
                    **({"word_rank": rank} if scene.word is not None else {})}
                   for (_, text, _), r, rank, scene in zip(samples, rows, ranks, scenes)],
    }, samples


def shapes_by_kind(rows: list, scenes) -> dict:
    """Per size and shape ("small square"): how many were drawn in that shape, of how many, and what the checker
    read the rest as (another shape, "empty", "word")."""
    out: dict = {}
    for row, scene in zip(rows, scenes):
        for score, obj in zip(row["objects"], scene.objects):
            entry = out.setdefault(f"{obj.size} {obj.shape}", {"right": 0, "of": 0, "read_as": {}})
            entry["of"] += 1
            entry["right"] += bool(score["shape"])
            if not score["shape"]:
                entry["read_as"][score["read_as"]] = entry["read_as"].get(score["read_as"], 0) + 1
    return dict(sorted(out.items()))


def eval_first_command(pipe, sampling: dict, seeds=range(10)) -> dict:
    """The README's first command (the first example prompt, two objects) for seeds 0-9: how many pictures the
    checker reads as exactly that scene."""
    from qimg.tiny.grammar import EXAMPLES

    text = EXAMPLES["generate"][0]
    scene = world.parse_prompt(text)
    right = [bool(checker.score_t2i(pipe.generate(text, seed=s, **sampling)[0], scene)["exact"]) for s in seeds]
    return {"prompt": text, "right": sum(right), "of": len(right)}


def eval_edits(pipe, scenes, rng: random.Random, sampling: dict, progress=None) -> tuple[dict, list]:
    rows, samples, seconds, kinds = [], [], [], []
    for i, source in enumerate(ticking(scenes, progress, "edit")):
        instruction, target = world.random_edit(source, rng)
        src_img = world.render(source)
        start = time.perf_counter()
        out = pipe.generate(instruction, images=[src_img], seed=i, **sampling)[0]
        seconds.append(time.perf_counter() - start)
        score = checker.score_edit(src_img, out, source, target)
        rows.append(score)
        kinds.append(world.parse_edit(instruction).kind)
        samples.append((out, instruction, score["satisfied"]))
    by_kind = {k: mean(r["satisfied"] for r, kk in zip(rows, kinds) if kk == k) for k in sorted(set(kinds))}
    return {
        "n": len(rows),
        "satisfied": mean(r["satisfied"] for r in rows),
        "satisfied_by_kind": by_kind,
        "untouched_psnr": mean(r["untouched_psnr"] for r in rows),
        "seconds_per_image": mean(seconds),
        "scenes": [{"instruction": text, "kind": kind, "satisfied": r["satisfied"],
                    "untouched_psnr": r["untouched_psnr"], "detected": r["target"]["detected"]}
                   for (_, text, _), kind, r in zip(samples, kinds, rows)],
    }, samples


def eval_layers(pipe, scenes, sampling: dict, progress=None) -> tuple[dict, list]:
    """Decompose each held-out render into as many layers as it was built from (the model captions it itself)."""
    rows, samples, seconds = [], [], []
    for i, scene in enumerate(ticking(scenes, progress, "layers")):
        truth, picture = world.render_layers(scene), world.render(scene)
        start = time.perf_counter()
        layers = pipe.layers(picture, layers=len(truth), seed=i, **sampling)
        seconds.append(time.perf_counter() - start)
        score = checker.score_layers(layers, truth)
        rows.append(score)
        ok = score["mean_alpha_iou"] >= 0.85 and score["composite_psnr"] >= 30
        if len(samples) < 2:
            strip = Image.new("RGB", (128 * (len(layers) + 1), 128), "white")
            strip.paste(picture, (0, 0))
            for k, layer in enumerate(layers):
                strip.paste(checkerboard(layer), (128 * (k + 1), 0))
            text = f"input, then {len(layers)} layers: IoU {score['mean_alpha_iou']:.2f}, " \
                   f"composite {score['composite_psnr']:.1f} dB"
            samples.append((strip, text, ok))
    return {
        "n": len(rows),
        "mean_alpha_iou": mean(r["mean_alpha_iou"] for r in rows),
        "mean_alpha_iou_by_objects": by_objects([r["mean_alpha_iou"] for r in rows], scenes),
        "rgb_l1": mean(r["rgb_l1"] for r in rows),
        "composite_psnr": mean(r["composite_psnr"] for r in rows),
        "seconds_per_image": mean(seconds),
        "scenes": [{k: r[k] for k in ("mean_alpha_iou", "rgb_l1", "composite_psnr")} for r in rows],
    }, samples


def checkerboard(layer: Image.Image, square: int = 8) -> Image.Image:
    """An RGBA layer over a grey checkerboard, so transparency shows in the grid."""
    yy, xx = np.mgrid[: layer.height, : layer.width]
    board = np.where(((yy // square) + (xx // square)) % 2 == 0, 200, 150).astype(np.uint8)
    base = Image.fromarray(np.stack([board] * 3, axis=-1)).convert("RGBA")
    return Image.alpha_composite(base, layer.convert("RGBA")).convert("RGB")


def grid(samples, path: Path, columns: int = 6) -> None:
    """A PNG grid of samples with their prompts and the checker's verdict."""
    font = ImageFont.truetype(str(world.FONT_PATH.parent / "DejaVuSans-Bold.ttf"), 9)
    cell_w, cell_h = 128, 128 + 40
    slots, k = [], 0
    for image, text, ok in samples:  # a wide sample (a layer strip) starts a row and spans several cells
        span = max(1, image.width // cell_w)
        if span > 1 or k % columns + span > columns:
            k = -(-k // columns) * columns
        slots.append(k)
        k += span
    rows = (k + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (image, text, ok) in zip(slots, samples):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        canvas.paste(image.convert("RGB"), (x, y))
        width = max(cell_w, image.width)
        words, lines, line = text.split(), [], ""
        for word in words:
            if draw.textlength(f"{line} {word}", font=font) > width - 4:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        colour = (0, 120, 0) if ok else (190, 0, 0)
        draw.text((x + 2, y + 129), ("[OK] " if ok else "[X] ") + "\n".join(lines[:3]), fill=colour, font=font)
    with atomic_write(path) as handle:
        canvas.save(handle, format="PNG")


def evaluate(pipe, n: int = 200, out: Path = Path("eval"), steps=None, cfg=None, seed: int = 0,
             tasks=("t2i", "edit"), layered=None, progress=None, cache: str | None = None) -> dict:
    """Score `pipe` (2.x: t2i, edit) and `layered` (a Layered pipeline: layers) on `n` held-out scenes per task,
    with the models' defaults unless `steps`, `cfg` or a step `cache` are given; `progress(task, done, total)` after
    each scene."""
    sampling = {"steps": steps, "cfg": cfg, "cache": cache}
    out.mkdir(parents=True, exist_ok=True)
    scenes = world.held_out(n, seed=seed)
    result = {"held_out_scenes": n, **sampling}
    if pipe is not None:
        result["model"] = pipe.describe()
    if layered is not None:
        result["layered_model"] = layered.describe()
    samples = []
    if "t2i" in tasks:
        result["t2i"], s = eval_t2i(pipe, scenes, sampling, progress)
        result["first_command"] = eval_first_command(pipe, sampling)
        if any(s.word is not None for s in scenes):
            result["word_gap"] = words.word_gap(pipe, scenes)
        samples += s[:18]
    if "edit" in tasks:
        result["edit"], s = eval_edits(pipe, scenes, random.Random(seed), sampling, progress)
        samples += s[:12]
    if "layers" in tasks:
        result["layers"], s = eval_layers(layered, scenes, sampling, progress)
        samples += s
    with atomic_write(out / "eval.json", "w") as handle:
        json.dump(result, handle, indent=2)
    grid(samples, out / "samples.png")
    return result


PASSED = {"t2i": ("prompt", "exact"), "edit": ("instruction", "satisfied")}


def compare(ours: dict, theirs: dict) -> dict:
    """Scene by scene, two `evaluate` results on the same held-out scenes: per task, how many scenes pass in both,
    only in `ours`, only in `theirs`, and the two-sided sign test's p-value of the split (how likely so uneven a
    split is if the two models were equally good)."""
    from qimg.errors import InputError

    out = {}
    for task, (key, passed) in PASSED.items():
        if task not in ours or task not in theirs:
            continue
        a, b = ours[task].get("scenes"), theirs[task].get("scenes")
        if a is None or b is None:
            raise InputError(f"{task}: an eval.json without per-scene rows (written before they were kept) cannot "
                             "be compared scene by scene")
        if [r[key] for r in a] != [r[key] for r in b]:
            raise InputError(f"{task}: the two evaluations did not see the same scenes ({len(a)} and {len(b)}; "
                             "--n and the held-out seed must match)")
        splits = Counter((bool(x[passed]), bool(y[passed])) for x, y in zip(a, b))
        only_ours, only_theirs = splits[True, False], splits[False, True]
        out[task] = {"n": len(a), "both": splits[True, True], "only_ours": only_ours, "only_theirs": only_theirs,
                     "sign_test_p": sign_test(only_ours, only_theirs)}
    if "t2i" in out:
        pairs = [(x.get("word_rank"), y.get("word_rank"))
                 for x, y in zip(ours["t2i"]["scenes"], theirs["t2i"]["scenes"])]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        if pairs:  # a lower rank is a drawn word nearer the true one
            nearer, farther = sum(x < y for x, y in pairs), sum(x > y for x, y in pairs)
            out["word_rank"] = {"n": len(pairs), "nearer": nearer, "farther": farther,
                                "sign_test_p": sign_test(nearer, farther)}
    return out


def sign_test(k: int, m: int) -> float:
    """Two-sided exact sign test: P(a split at least as uneven as k:m | each discordant scene a fair coin)."""
    import math

    n = k + m
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, m) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
