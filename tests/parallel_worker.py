"""One rank of the parallel tests (started by `qimg.parallel.launch`): runs the jobs of a JSON file, each a
pipeline loaded with its `parallel` setting; rank 0 saves the pictures (`NAME.npy`, uint8 [N, H, W, C]) and the
outcome of each job (`outcomes.json`: "ok", or the error's message)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import qimg
from qimg.errors import QimgError


def run(job: dict) -> list[Image.Image] | np.ndarray:
    rank = int(os.environ["RANK"])
    dtype = job.get("dtype_by_rank", [None] * 8)[rank]
    pipe = qimg.load(job["folder"], parallel=job["parallel"], dtype=dtype, **job.get("load", {}))
    if job.get("task") == "vae":  # random latents through the tiled decoder, tiles shared by the ranks
        z = torch.randn(1, pipe.vae.z_dim, *job["grid"], generator=torch.Generator().manual_seed(0))
        pixels = torch.rand(1, pipe.vae.image_channels, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with pipe.sharing_tiles():
            decoded = pipe.vae.decode(z, tile=tuple(job["tile"])).numpy()
            encoded = pipe.vae.encode(pixels, tile=tuple(job["tile"])).numpy()
        return np.concatenate([decoded.reshape(-1), encoded.reshape(-1)])
    options = dict(job.get("options", {}))
    images = [Image.open(p) for p in job.get("images", [])]
    if job.get("task") == "layers":
        return pipe.layers(images[0], **options)
    return pipe.generate(job["prompt"], images=images, **options)


def main(jobs_file: str) -> int:
    spec = json.loads(Path(jobs_file).read_text())
    out = Path(spec["out"])
    outcomes = {}
    for job in spec["jobs"]:
        try:
            pictures = run(job)
            outcomes[job["name"]] = "ok"
            if int(os.environ["RANK"]) == 0 and isinstance(pictures, np.ndarray):
                np.save(out / f"{job['name']}.npy", pictures)
            elif int(os.environ["RANK"]) == 0:
                np.save(out / f"{job['name']}.npy", np.stack([np.asarray(p) for p in pictures]))
                outcomes[job["name"] + ":meta"] = pictures[0].info["qimg"]
        except QimgError as err:
            outcomes[job["name"]] = f"error: {err}"
    if int(os.environ["RANK"]) == 0:
        (out / "outcomes.json").write_text(json.dumps(outcomes, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
