"""How much each low-bit format changes the model: relative L2 error of the transformer's output (one cached 2.x
denoising call on fixed inputs) and PSNR of whole pictures, both against float32.

    python bench/lowbit_quality.py [--prompts 16] [--output bench/results/lowbit_quality.json]

Models: qimg-tiny (pictures: its 3-step cfg-2 generation of held-out prompts, seed i for prompt i) and a random
97M-parameter 2.x transformer ("medium", as in bench/step_time.py; output error only). Formats: weight-only int8
and fp8 on load, and GGUF Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0 written by `qimg.lowbit.write` (Linear
weights; the rest F32; K-quants with qimg's encoders, and Linear weights whose rows a 256-weight K-quant block cannot
tile in the fallback llama.cpp uses: Q6_K -> Q8_0, Q5_K -> Q5_1, Q4_K -> Q5_0; the "in K" column says how many of
the Linear weights' parameters the K-quant holds: qimg-tiny's widths, 192 and 576, never tile). Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "lowbit_quality.json"
GGUF_KINDS = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0"]
MEDIUM = dict(num_layers=12, attention_head_dim=128, num_attention_heads=6, axes_dims_rope=(16, 56, 56),
              in_channels=64, out_channels=64, context_in_dim=768)


def psnr(a, b) -> float:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / max((d**2).mean(), 1e-12)))


def quantized_copies(module, state_dict, workdir: Path):
    """(format, a copy of `module` with its Linear weights in that format) for every format measured."""
    import copy

    from qimg.lowbit.load import load_gguf_module
    from qimg.lowbit.weight_only import quantize_linears
    from qimg.lowbit.write import linear_weights, write_gguf

    for kind in ("int8", "fp8"):
        yield kind, quantize_linears(copy.deepcopy(module), kind), 1.0
    for kind in GGUF_KINDS:
        path = workdir / f"{kind}.gguf"
        chosen = write_gguf(state_dict, path, linear_weights(kind))
        linear = [name for name, t in state_dict.items() if t.ndim == 2 and name.endswith(".weight")]
        share = sum(state_dict[n].numel() for n in linear if chosen[n] == kind) / sum(
            state_dict[n].numel() for n in linear)
        yield kind, load_gguf_module(lambda: type(module)(module.cfg), path, dtype=torch.float32, device="cpu"), share


def output_error(model, reference_out, inputs) -> float:
    with torch.inference_mode():
        out = model(**inputs)
    return float((out - reference_out).norm() / reference_out.norm())


def transformer_inputs(cfg, tokens: int, text: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    side = int(tokens**0.5)
    return dict(latents=torch.randn(1, side * side, cfg.in_channels, generator=g),
                text=torch.randn(1, text, cfg.context_in_dim, generator=g), sigma=torch.tensor([0.6]),
                slot_mask=torch.zeros(text, dtype=torch.bool), shape=(side, side))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    import qimg
    from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
    from qimg.tiny import world

    rows = []
    work = Path(tempfile.mkdtemp(prefix="qimg-lowbit-"))
    base = qimg.load()
    prompts = [world.prompt(scene) for scene in world.held_out(args.prompts, seed=11)]
    reference = [base.generate(prompt, seed=i)[0] for i, prompt in enumerate(prompts)]
    tiny_sd = {k: v.detach().float().clone() for k, v in base.transformer.state_dict().items()}
    tiny_inputs = transformer_inputs(base.transformer.cfg, 64, 12)
    with torch.inference_mode():
        tiny_out = base.transformer(**tiny_inputs)
    original = base.transformer
    for kind, model, share in quantized_copies(original, tiny_sd, work):
        base.transformer = model
        pictures = [base.generate(prompt, seed=i)[0] for i, prompt in enumerate(prompts)]
        rows.append({"model": "qimg-tiny", "format": kind, "output_rel_l2": output_error(model, tiny_out, tiny_inputs),
                     "picture_psnr_db": float(np.mean([psnr(a, b) for a, b in zip(pictures, reference)])),
                     "pictures": len(prompts), "share_in_format": share})
    base.transformer = original

    cfg = QwenImage21Config(**MEDIUM)
    medium = QwenImage21Transformer(cfg).eval()
    medium_sd = {k: v.detach().float().clone() for k, v in medium.state_dict().items()}
    inputs = transformer_inputs(cfg, 1024, 256)
    with torch.inference_mode():
        medium_out = medium(**inputs)
    for kind, model, share in quantized_copies(medium, medium_sd, work):
        rows.append({"model": "medium 2.x (97M, random)", "format": kind, "share_in_format": share,
                     "output_rel_l2": output_error(model, medium_out, inputs), "picture_psnr_db": None})

    print(f"{'model':<26} {'format':<6} {'share':>6} {'output rel. L2':>14} {'picture PSNR':>13}")
    for r in rows:
        psnr_text = "-" if r["picture_psnr_db"] is None else f"{r['picture_psnr_db']:.1f} dB"
        print(f"{r['model']:<26} {r['format']:<6} {r['share_in_format']:>6.0%} {r['output_rel_l2']:>14.2e} "
              f"{psnr_text:>13}")
    result = {"rows": rows, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                        "platform": platform.platform(), "torch": torch.__version__},
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from qimg.atomic import atomic_write

    with atomic_write(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
