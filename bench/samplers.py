"""How close each sampler gets to a converged picture in few steps, on the embedded qimg-tiny at cfg 2.

    python bench/samplers.py [--prompts 16] [--steps 6,10,16] [--reference-steps 100] [--threads 2]

For held-out prompts of the synthetic world (seed i for prompt i), every sampler in qimg's table runs at each step
count; the reference is a `--reference-steps` Euler run on the same seed and prompt. PSNR is over the RGBA pixels
(8-bit), averaged over prompts; "vs ref s" is the reference's time per picture. Prints a table and writes
bench/results/samplers.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import qimg
from qimg.sampling.samplers import SAMPLERS
from qimg.tiny import world


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", default="6,10,16")
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "samplers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    pipe = qimg.load(dtype="float32", device="cpu")
    prompts = [world.prompt(scene) for scene in world.held_out(args.prompts, seed=11)]
    start = time.perf_counter()
    references = [pipe.generate(p, seed=i, steps=args.reference_steps, cfg=args.cfg)[0] for i, p in enumerate(prompts)]
    ref_seconds = (time.perf_counter() - start) / len(prompts)
    rows = []
    for name in sorted(SAMPLERS):
        for n in steps:
            scores, seconds = [], []
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                image = pipe.generate(p, seed=i, steps=n, cfg=args.cfg, sampler=name)[0]
                seconds.append(time.perf_counter() - t0)
                scores.append(psnr(image, references[i]))
            rows.append({"sampler": name, "steps": n, "psnr_db": statistics.mean(scores),
                         "psnr_min_db": min(scores), "seconds": statistics.median(seconds)})
    print(f"qimg-tiny, cfg {args.cfg}, {len(prompts)} prompts; reference: euler at {args.reference_steps} steps "
          f"({ref_seconds:.2f} s per picture)")
    print(f"{'sampler':<10}" + "".join(f"{f'{n} steps':>18}" for n in steps))
    for name in sorted(SAMPLERS):
        cells = [r for r in rows if r["sampler"] == name]
        print(f"{name:<10}" + "".join(f"{r['psnr_db']:>9.2f} dB {r['seconds']:>5.2f} s" for r in cells))
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": "qimg-tiny", "cfg": args.cfg, "prompts": len(prompts),
                               "reference_steps": args.reference_steps, "reference_seconds": ref_seconds,
                               "threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
