"""What a LoRA costs at denoising time: one cached 2.x step with no LoRA, a LoRA fused into the weights, and the same
LoRA unfused (beside the weights), plus the time to switch and to fuse.

    python bench/lora.py [--config medium] [--rank 16,64] [--repeats 5] [--device cpu|cuda] [--dtype float32]

The LoRA adapts every Linear in the transformer blocks (attention and MLP), as the Lightning and most style LoRAs
do. Prints a table and writes bench/results/lora[-DEVICE].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from step_time import median_time, sync  # bench/ is on the path when a script here runs

CONFIGS = {
    "tiny": (dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                  in_channels=16, out_channels=16, context_in_dim=32), 64, 16),
    "medium": (dict(num_layers=12, attention_head_dim=128, num_attention_heads=6, axes_dims_rope=(16, 56, 56),
                    in_channels=64, out_channels=64, context_in_dim=768), 512, 256),
    "full-1024": (dict(), 1024, 256),  # the official 2.1 transformer (GPU only)
}


def main() -> None:
    from safetensors.torch import save_file

    from qimg.adapters.manager import Adapters
    from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="medium", choices=sorted(CONFIGS))
    parser.add_argument("--rank", default="16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg, side, n_text = CONFIGS[args.config]
    config = QwenImage21Config(**cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = QwenImage21Transformer(config)
    model = model.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    h = w = side // 16
    text = torch.randn(1, n_text, config.context_in_dim, device=device, dtype=dtype)
    latents = torch.randn(1, h * w, config.in_channels, device=device, dtype=dtype)
    sigma = torch.tensor([0.5], device=device)
    with torch.inference_mode():
        prefix = model.encode_prefix(text, torch.zeros(n_text, dtype=torch.bool, device=device))
        freqs = model.target_rope(prefix, (h, w))

    def step():
        with torch.inference_mode():
            model.denoise(latents, sigma, prefix, (h, w), freqs)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and n.startswith("transformer_blocks.")}
    adapters = Adapters(model, "2.x", "QwenImage21Pipeline")
    rows = []
    base_s = median_time(step, args.repeats, device)[0]
    folder = Path(tempfile.mkdtemp(prefix="qimg-bench-lora-"))
    for rank in (int(r) for r in args.rank.split(",")):
        g = torch.Generator().manual_seed(rank)
        sd = {}
        for name, m in layers.items():
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
        path = folder / f"r{rank}.safetensors"
        save_file(sd, str(path))
        start = time.perf_counter()
        adapters.set([(path, 0.8)], fused=False)
        attach_s = time.perf_counter() - start
        unfused_s = median_time(step, args.repeats, device)[0]
        start = time.perf_counter()
        adapters.set([(path, 0.8)], fused=True)
        sync(device)
        fuse_s = time.perf_counter() - start
        fused_s = median_time(step, args.repeats, device)[0]
        start = time.perf_counter()
        adapters.set([(path, 0.5)], fused=False)  # re-weight: unfuse, no re-read
        sync(device)
        switch_s = time.perf_counter() - start
        adapters.clear()
        params = sum(t.numel() for t in sd.values())
        rows.append({"rank": rank, "lora_parameters": params, "no_lora_s": base_s, "fused_s": fused_s,
                     "unfused_s": unfused_s, "unfused_overhead": unfused_s / base_s - 1,
                     "fused_overhead": fused_s / base_s - 1, "attach_s": attach_s, "fuse_s": fuse_s,
                     "reweight_s": switch_s})
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    print(f"{args.config} 2.x config ({sum(p.numel() for p in model.parameters()):,} parameters), {side}², "
          f"{n_text}-token prompt, {args.device} {args.dtype}{', ' + gpu if gpu else ''}; LoRA on "
          f"{len(layers)} block layers")
    print(f"{'rank':>5} {'LoRA params':>12} {'no LoRA s':>10} {'fused s':>9} {'unfused s':>10} {'unfused +':>10} "
          f"{'attach s':>9} {'fuse s':>8} {'re-weight s':>12}")
    for r in rows:
        print(f"{r['rank']:>5} {r['lora_parameters']:>12,} {r['no_lora_s']:>10.4f} {r['fused_s']:>9.4f} "
              f"{r['unfused_s']:>10.4f} {100 * r['unfused_overhead']:>9.1f}% {r['attach_s']:>9.3f} "
              f"{r['fuse_s']:>8.3f} {r['reweight_s']:>12.3f}")
    name = "lora.json" if device.type == "cpu" else f"lora-{device.type}.json"
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps({"config": args.config, "device": args.device, "gpu": gpu, "dtype": args.dtype,
                               "threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
