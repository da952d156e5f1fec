"""How far a reduced-precision run of the shipped qimg-tiny drifts from float32 on the same device, per component.

    python bench/dtype_drift.py [--device cpu|cuda] [--dtype bfloat16|float16] [--prompts 4]

For each held-out prompt, the float32 pipeline and the reduced-precision one get the same inputs at each stage.
The pipelines draw their noise as the reference does, in the model's dtype, and torch's half-precision normals
can differ from its float32 ones (depending on size and torch version): "noise" reports that difference, and the
whole runs below start from the float32 draw, cast, so that they measure arithmetic alone.
  noise        relative L2 difference of the seed's noise drawn in the dtype against the float32 draw
  encoder      relative L2 error of the condition states
  transformer  relative L2 error of one velocity (float32 states and noise, cast), at sigma 1.0 and 0.5
  sampler      relative L2 error of the final latents of a whole 5-step run (everything in reduced precision)
  vae          PSNR of decoding the float32 run's final latents
  image        PSNR of the whole picture against the float32 picture
Prints a table and writes bench/results/dtype_drift-{device}-{dtype}.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

import qimg
import qimg.pipelines.pipeline as pipeline_module
from qimg.options import GenerateOptions
from qimg.pipelines.base import draw_noise
from qimg.tiny import checker, world


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def psnr(a, b) -> float:
    return checker.psnr(np.asarray(a.convert("RGB"), np.float32), np.asarray(b.convert("RGB"), np.float32))


def final_latents(pipe, prompt: str, seed: int) -> torch.Tensor:
    """The latents the sampler hands to the decoder (captured at the decode call)."""
    captured = {}
    decode = pipe.decode

    def capture(plan, tokens):
        captured["x"] = tokens
        return decode(plan, tokens)

    pipe.decode = capture
    try:
        image = pipe.generate(prompt, seed=seed)[0]
    finally:
        pipe.decode = decode
    return captured["x"], image


def float32_noise(shape, generator, dtype):
    return torch.randn(shape, generator=generator).to(dtype)


def drift(full, low, prompt: str, seed: int) -> dict:
    dev, dtype = low.info.device, low.info.dtype
    c32, c16 = full.conditioner.encode(prompt, []), low.conditioner.encode(prompt, [])
    h = w = 128 // full.vae.scale_factor
    shape = (1, 1, full.transformer.cfg.in_channels, h, w)
    drawn = draw_noise(shape, torch.Generator().manual_seed(seed), dtype)
    row = {"noise": rel(drawn, float32_noise(shape, torch.Generator().manual_seed(seed), torch.float32)),
           "encoder": rel(c16.states, c32.states)}
    noise = torch.randn((1, h * w, full.transformer.cfg.in_channels), generator=torch.Generator().manual_seed(seed))
    plan = full.plan(GenerateOptions(prompt=prompt, width=128, height=128, seed=seed))
    v32 = full.velocity(plan, c32, ([], []))
    v16 = low.velocity(plan, dataclasses.replace(c32, states=c32.states.to(dtype)), ([], []))
    for s in (1.0, 0.5):
        sigma = torch.tensor([s])
        a = v32(noise.to(full.info.device), sigma.to(full.info.device))
        b = v16(noise.to(dev, dtype), sigma.to(dev))
        row[f"transformer@{s}"] = rel(b, a)
    pipeline_module.draw_noise = float32_noise
    try:
        x32, img32 = final_latents(full, prompt, seed)
        x16, img16 = final_latents(low, prompt, seed)
    finally:
        pipeline_module.draw_noise = draw_noise
    row["sampler"] = rel(x16, x32)
    row["vae"] = psnr(low.decode(plan, x32.to(dev, dtype))[0], img32)
    row["image"] = psnr(img16, img32)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-reduced-reduction", action="store_true",
                        help="CUDA: no reduced-precision reductions in half/bfloat16 matrix products")
    parser.add_argument("--sdpa-math", action="store_true", help="attention through the plain math kernel")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.no_reduced_reduction:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    if args.sdpa_math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_kernel(SDPBackend.MATH).__enter__()
    full = qimg.load(dtype="float32", device=args.device)
    low = qimg.load(dtype=args.dtype, device=args.device)
    rows = []
    for i, scene in enumerate(world.held_out(args.prompts, seed=7)):
        rows.append({"prompt": world.prompt(scene), **drift(full, low, world.prompt(scene), i)})
    cols = ["noise", "encoder", "transformer@1.0", "transformer@0.5", "sampler", "vae", "image"]
    print(f"{args.device} {args.dtype} vs float32 (relative L2 error; vae and image: PSNR dB)")
    print(" ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>16.4f}" if c not in ("vae", "image") else f"{r[c]:>16.1f}" for c in cols))
    mean = {c: float(np.mean([r[c] for r in rows])) for c in cols}
    print(" ".join(f"{mean[c]:>16.4f}" for c in cols), " (mean)")
    variant = "".join(f"-{k}" for k in ("no_reduced_reduction", "sdpa_math") if getattr(args, k))
    out = Path(__file__).parent / "results" / f"dtype_drift-{args.device}-{args.dtype}{variant}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "variant": variant or None,
                               "torch": torch.__version__,
                               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                               "mean": mean, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
