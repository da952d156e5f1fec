"""Time one denoising step (KV cache on) of qimg's 2.x transformer against the reference, same weights and threads.

    python bench/step_time.py [--threads 2] [--repeats 5] [--configs tiny,medium]

Prints a table and writes bench/results/step_time.json. Timings of the two implementations are interleaved so
that background load affects both alike; the figure is the median of `repeats` steps after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

CONFIGS = {
    # name: (transformer config, image side in px, prompt tokens)
    "tiny": (dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                  in_channels=16, out_channels=16, context_in_dim=32), 64, 16),
    "medium": (dict(num_layers=12, attention_head_dim=128, num_attention_heads=6, axes_dims_rope=(16, 56, 56),
                    in_channels=64, out_channels=64, context_in_dim=768), 512, 256),
}


def build(cfg: dict):
    import diffusers

    from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer

    torch.manual_seed(0)
    ref = diffusers.QwenImage21Transformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = QwenImage21Transformer(QwenImage21Config.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, repeats: int) -> dict:
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cfg, side, n_text = CONFIGS[name]
    ref, ours = build(cfg)
    h = w = side // 16
    text = torch.randn(1, n_text, cfg["context_in_dim"])
    latents = torch.randn(1, h * w, cfg["in_channels"])
    sigma = torch.tensor([0.5])
    img_mask = torch.cat([torch.zeros(n_text, dtype=torch.bool), torch.ones(h * w // 4, dtype=torch.bool)])[None]
    kwargs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=sigma, img_shapes=[[(1, h, w)]],
                  img_mask=img_mask, return_dict=False)
    cache = QwenImage21KVCache(cfg["num_layers"])
    with torch.inference_mode():
        ref(kv_cache=cache, kv_cache_mode="extract", **kwargs)
        prefix = ours.encode_prefix(text, torch.zeros(n_text, dtype=torch.bool))
        freqs = ours.target_rope(prefix, (h, w))
        ref_out = ref(kv_cache=cache, kv_cache_mode="cached", **kwargs)[0][:, -h * w:]
        our_out = ours.denoise(latents, sigma, prefix, (h, w), freqs)
        diff = (ref_out - our_out).abs().max().item()
        t_ref, t_ours = [], []
        for _ in range(3):  # interleave rounds
            t_ref.append(median_time(lambda: ref(kv_cache=cache, kv_cache_mode="cached", **kwargs), repeats))
            t_ours.append(median_time(lambda: ours.denoise(latents, sigma, prefix, (h, w), freqs), repeats))
    params = sum(p.numel() for p in ours.parameters())
    ref_s, ours_s = min(t_ref), min(t_ours)
    return {"config": name, "params": params, "image": f"{side}x{side}", "prompt_tokens": n_text,
            "reference_s": ref_s, "qimg_s": ours_s, "speedup": ref_s / ours_s, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="tiny,medium")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(name, args.repeats) for name in args.configs.split(",")]
    print(f"{'config':<8} {'params':>12} {'image':>9} {'text':>5} {'reference s':>12} {'qimg s':>9} "
          f"{'speed-up':>9} {'max diff':>9}")
    for r in rows:
        print(f"{r['config']:<8} {r['params']:>12,} {r['image']:>9} {r['prompt_tokens']:>5} {r['reference_s']:>12.4f} "
              f"{r['qimg_s']:>9.4f} {r['speedup']:>8.2f}x {r['max_abs_diff']:>9.1e}")
    out = Path(__file__).parent / "results" / "step_time.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
