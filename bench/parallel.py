"""Denoising step time of one guided picture on 1, 2 and 4 processes (CPU ranks with gloo, or GPUs with NCCL).

    python bench/parallel.py [--steps 4] [--size 512] [--out FILE]                 # CPU: the medium config
    python bench/parallel.py --device cuda --config full --size 2048 --gpus 1,2,4   # GPUs: official 2.1 size

The model is a Qwen-Image-2.1 pipeline folder written here: the tiny test encoder and VAE with a larger transformer
(`medium`: 12 layers of width 768, 6 heads, the config of bench/step_time.py; `full`: the official 7B shape, random
weights). Each run is `qimg` itself (`qimg.load(..., parallel=...)` in every rank, started by
`qimg.parallel.launch`); rank 0 records the wall time of every denoising step (the first, which warms up, is
left out; the figure is the median) and the picture, which is compared with the 1-process picture. CPU ranks
share the machine's cores: with P processes each gets cores/P threads, so on a 2-core machine these figures
show the overheads of the exchanges, not the speed-up more devices give. Prints a table and writes JSON
(bench/results/parallel-{device}.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "medium": dict(num_layers=12, attention_head_dim=128, num_attention_heads=6, axes_dims_rope=(16, 56, 56)),
    "full": dict(),
}
SPLITS = {1: [None], 2: ["cfg=2", "ulysses=2"], 4: ["ulysses=2,cfg=2", "ulysses=4"]}


def write_folder(folder: Path, config: str) -> None:
    """The tiny test pipeline with its transformer replaced by `config`'s (seeded random weights)."""
    import diffusers
    import torch

    from tests.reference import build_reference_21, perturb

    build_reference_21(folder)
    shape = dict(in_channels=16, out_channels=16, context_in_dim=32, **CONFIGS[config])
    with torch.device("meta" if config == "full" else "cpu"):
        transformer = diffusers.QwenImage21Transformer2DModel(**shape)
    if config == "full":
        transformer = transformer.to_empty(device="cpu").to(torch.bfloat16)
        for p in transformer.parameters():
            torch.nn.init.normal_(p, std=0.02)
    else:
        perturb(transformer)
    transformer.save_pretrained(folder / "transformer")


def rank_main(spec_file: str) -> int:
    """One rank: load, make the picture, and (rank 0) write the step times and the picture."""
    import numpy as np
    import torch.distributed as dist

    import qimg

    spec = json.loads(Path(spec_file).read_text())
    pipe = qimg.load(spec["folder"], parallel=spec["parallel"], device=spec["device"], dtype=spec["dtype"])
    stamps = []

    def progress(event):
        if event.stage == "denoise":
            stamps.append(time.perf_counter())

    size = spec["size"]
    image = pipe.generate("a red circle and a blue square", cfg=4.0, width=size, height=size, steps=spec["steps"],
                          seed=1, progress=progress)[0]
    if int(os.environ.get("RANK", "0")) == 0:
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        out = Path(spec["out"])
        np.save(out.with_suffix(".npy"), np.asarray(image))
        out.write_text(json.dumps({"steps": steps}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def measure(folder: Path, work: Path, parallel: str | None, processes: int, args) -> dict:
    from qimg.parallel.launch import launch, rank_environment

    name = (parallel or "one").replace(",", "_").replace("=", "")
    out = work / f"{name}.json"
    spec = work / f"{name}-spec.json"
    spec.write_text(json.dumps({"folder": str(folder), "parallel": parallel, "device": args.device,
                                "dtype": args.dtype, "size": args.size, "steps": args.steps, "out": str(out)}))
    threads = max(1, (os.cpu_count() or 1) // processes) if args.device == "cpu" else 1
    argv = [str(Path(__file__).resolve()), "--rank", str(spec)]
    if processes == 1:
        import subprocess

        env = {k: v for k, v in rank_environment(0, 1, 0, threads).items() if k not in ("RANK", "WORLD_SIZE")}
        code = subprocess.run([sys.executable, *argv], env=env).returncode
    else:
        code = launch(argv, processes, threads=threads, timeout=3600)
    if code != 0:
        raise SystemExit(f"{parallel}: the ranks failed (exit {code})")
    steps = json.loads(out.read_text())["steps"][1:]
    return {"parallel": parallel or "none", "processes": processes, "threads_per_process": threads,
            "step_s": statistics.median(steps), "steps_timed": len(steps), "picture": str(out.with_suffix(".npy"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gpus", default="1,2,4", help="process counts to run (default 1,2,4)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.rank:
        return rank_main(args.rank)
    import numpy as np

    from qimg.parallel.config import ParallelConfig

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "model"
        write_folder(folder, args.config)
        rows = []
        for processes in (int(n) for n in args.gpus.split(",")):
            heads = CONFIGS[args.config].get("num_attention_heads", 32)
            for parallel in SPLITS[processes]:
                if parallel and heads % ParallelConfig.parse(parallel).ulysses:
                    continue  # the medium config's 6 heads do not split 4 ways
                rows.append(measure(folder, work, parallel, processes, args))
        base = rows[0]
        alone = np.load(base["picture"]).astype(int)
        for row in rows:
            row["speedup"] = base["step_s"] / row["step_s"]
            row["max_pixel_diff"] = int(np.abs(np.load(row["picture"]).astype(int) - alone).max())
            del row["picture"]
    print(f"{args.config} 2.1 transformer, {args.size}x{args.size}, guided (cfg 4), {args.device}, "
          f"{os.cpu_count()} cores")
    print(f"{'parallel':<18}{'procs':>6}{'threads':>8}{'step s':>9}{'vs 1':>7}{'max diff':>10}")
    for row in rows:
        print(f"{row['parallel']:<18}{row['processes']:>6}{row['threads_per_process']:>8}{row['step_s']:>9.3f}"
              f"{row['speedup']:>6.2f}x{row['max_pixel_diff']:>10}")
    out = Path(args.out or ROOT / "bench" / "results" / f"parallel-{args.device}.json")
    result = {"config": args.config, "size": args.size, "device": args.device, "cores": os.cpu_count(),
              "steps": args.steps, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
