"""Step caches on qimg-tiny: transformer evaluations skipped, PSNR against qimg's own uncached picture, and time.

    python bench/step_cache.py [--prompts 50] [--steps 30] [--cfg 2] [--caches fbcache:0.1,fbcache:0.2,magcache:0.12]

Held-out prompts of the synthetic world, seed i for prompt i, each generated without a cache and with
every cache of `--caches`; "calls saved" is model calls / full calls (2.0x: half the calls ran in full; a skipped
fbcache call still runs the first block, a skipped magcache call runs none). Also edits (`--edit-steps`) on
held-out edits, and with `--tasks ...,layers` layer splits of held-out pictures by qimg-tiny-layered (PSNR over
all the layers of a split, RGBA).
Prints a table and writes bench/results/step_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def psnr(a, b) -> float:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / max((d**2).mean(), 1e-10)))


def measure(run, requests, cache: str | None) -> tuple[list, float, int, int]:
    """`run(request, cache) -> pictures` for every request: (each request's pictures side by side, seconds per
    request, model calls, skipped calls)."""
    pictures, calls, skipped = [], 0, 0
    start = time.perf_counter()
    for request in requests:
        out = run(request, cache)
        pictures.append(np.concatenate([np.asarray(img) for img in out], axis=1))
        meta = out[0].info["qimg"]
        calls += meta.get("model_calls", 0)
        skipped += meta.get("cache_skipped", 0)
    return pictures, (time.perf_counter() - start) / len(requests), calls, skipped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--edit-steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--caches", default="fbcache:0.1,fbcache:0.2,fbcache:0.3,magcache:0.06,magcache:0.12,magcache:0.2")
    p.add_argument("--tasks", default="t2i,edit", help="any of t2i, edit, layers (qimg-tiny-layered)")
    p.add_argument("--layers-steps", type=int, default=30)
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "step_cache.json"))
    args = p.parse_args(argv)
    import random

    import qimg
    from qimg.tiny import world

    tasks = args.tasks.split(",")
    pipe = qimg.load() if {"t2i", "edit"} & set(tasks) else None
    scenes = world.held_out(args.prompts, seed=11)
    t2i = [dict(prompt=world.prompt(s), seed=i, steps=args.steps, cfg=args.cfg) for i, s in enumerate(scenes)]
    rng = random.Random(5)
    edits = []
    for i, scene in enumerate(scenes[: max(1, args.prompts // 2)]):
        instruction, _ = world.random_edit(scene, rng)
        edits.append(dict(prompt=instruction, images=[world.render(scene)], seed=i, steps=args.edit_steps))
    layered = qimg.load("qimg-tiny-layered") if "layers" in tasks else None
    splits = [dict(image=world.render(s).convert("RGBA"), prompt=world.prompt(s), seed=i, steps=args.layers_steps)
              for i, s in enumerate(scenes[: max(1, args.prompts // 2)])]
    work = {"t2i": (lambda r, c: pipe.generate(**r, cache=c), t2i),
            "edit": (lambda r, c: pipe.generate(**r, cache=c), edits),
            "layers": (lambda r, c: layered.layers(**r, cache=c), splits)}
    rows = []
    for task in tasks:
        run, requests = work[task]
        measure(run, requests[:2], None)  # warm-up: first calls pay one-off costs
        base, base_s, _, _ = measure(run, requests, None)
        for cache in args.caches.split(","):
            pictures, seconds, calls, skipped = measure(run, requests, cache)
            scores = [psnr(a, b) for a, b in zip(pictures, base)]
            rows.append({"task": task, "cache": cache, "requests": len(requests),
                         "calls": calls, "skipped": skipped, "calls_saved": calls / max(1, calls - skipped),
                         "psnr_mean_db": float(np.mean(scores)), "psnr_min_db": float(np.min(scores)),
                         "seconds_per_picture": seconds, "uncached_seconds": base_s,
                         "speedup": base_s / seconds})
    print(f"{'task':<5} {'cache':<13} {'skipped':>12} {'calls saved':>11} {'PSNR mean':>9} {'min':>6} "
          f"{'s/pic':>6} {'speed-up':>8}")
    for r in rows:
        print(f"{r['task']:<5} {r['cache']:<13} {r['skipped']:>5}/{r['calls']:<6} {r['calls_saved']:>10.2f}x "
              f"{r['psnr_mean_db']:>8.1f} {r['psnr_min_db']:>6.1f} {r['seconds_per_picture']:>6.3f} "
              f"{r['speedup']:>7.2f}x")
    from qimg.atomic import atomic_write

    with atomic_write(args.output, "w") as handle:
        json.dump({"steps": args.steps, "cfg": args.cfg, "rows": rows,
                   "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                               "platform": platform.platform()}, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                  handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
