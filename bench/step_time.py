"""Time one denoising step of qimg's transformers against the reference, same weights and threads: the 2.x
transformer with its prefix KV cache on, and the v1 (Qwen-Image / Edit / Layered) transformer.

    python bench/step_time.py [--threads 2] [--repeats 5] [--configs tiny,medium,v1-tiny,v1-medium] [--out FILE]
    python bench/step_time.py --device cuda --dtype bfloat16 --configs medium,full-1024,full-2048
    python bench/step_time.py --compile     # qimg's blocks compiled (writes step_time-compiled.json)
    python bench/step_time.py --compile step  # the whole step compiled (step_time-compiled-step.json)
    python bench/step_time.py --fused       # q/k/v and gate/up fused, as a GPU load does (step_time-fused.json)

Prints a table and writes bench/results/step_time.json (step_time-cuda.json on a GPU). Timings of the two
implementations are interleaved so that background load affects both alike; the figure is the median of
`repeats` steps after a warm-up. Below float32, "ref err" and "qimg err" are each output's relative L2 error
against float32 arithmetic on the same rounded weights. On CUDA the two models share one set of weights, and "peak GiB" is each step's
allocation high-water mark above the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qimg.models.fused import fuse_projections

CONFIGS = {
    # name: (transformer config, image side in px, prompt tokens)
    "tiny": (dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                  in_channels=16, out_channels=16, context_in_dim=32), 64, 16),
    "medium": (dict(num_layers=12, attention_head_dim=128, num_attention_heads=6, axes_dims_rope=(16, 56, 56),
                    in_channels=64, out_channels=64, context_in_dim=768), 512, 256),
    # the official Qwen-Image-2.1 transformer (about 7B parameters; random weights): GPU only
    "full-1024": (dict(), 1024, 256),
    "full-2048": (dict(), 2048, 256),
}
V1_CONFIGS = {
    # name: (v1 transformer config, image side in px, prompt tokens); 2x2 patches of the 8x VAE: 16 px per token
    "v1-tiny": (dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                     in_channels=64, out_channels=16, joint_attention_dim=32), 64, 16),
    "v1-medium": (dict(num_layers=6, attention_head_dim=128, num_attention_heads=6, axes_dims_rope=(16, 56, 56),
                       in_channels=64, out_channels=16, joint_attention_dim=768), 512, 256),
}


def reference(cls, cfg: dict, device: torch.device, dtype: torch.dtype):
    """The reference transformer `cls(**cfg)` with seeded, perturbed weights in `dtype` on `device`."""
    torch.manual_seed(0)
    with device:
        ref = cls(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref.to(dtype)


def build(cfg: dict, device: torch.device, dtype: torch.dtype):
    import diffusers

    from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer

    ref = reference(diffusers.QwenImage21Transformer2DModel, cfg, device, dtype)
    config = QwenImage21Config.from_dict(dict(ref.config))
    if device.type == "cpu":  # its own copy, as a loaded model would have
        ours = QwenImage21Transformer(config).eval()
        ours.load_state_dict(ref.state_dict())
        return ref, ours
    with torch.device("meta"):
        ours = QwenImage21Transformer(config).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)  # the same tensors: one copy of 7B weights on the GPU
    return ref, ours


def matmul_floor(c, tokens: int, prefix: int, repeats: int, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds the step's matrix products and attention alone take (one product per projection, as fused as they
    get, no norms, RoPE or residuals): the floor no implementation of this step goes below on this machine."""
    dim, hidden = c.dim, c.dim * c.mlp_ratio
    x = torch.randn(tokens, dim, device=device, dtype=dtype)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype)
    def weight(rows, cols):
        return torch.randn(rows, cols, device=device, dtype=dtype)

    w_qkv, w_out, w_up, w_down = weight(3 * dim, dim), weight(dim, dim), weight(2 * hidden, dim), weight(dim, hidden)
    q = torch.randn(1, c.num_attention_heads, tokens, c.attention_head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, c.num_attention_heads, tokens + prefix, c.attention_head_dim, device=device, dtype=dtype)

    def step():
        for _ in range(c.num_layers):
            F.linear(x, w_qkv), F.scaled_dot_product_attention(q, kv, kv), F.linear(x, w_out)
            F.linear(x, w_up), F.linear(h, w_down)

    return median_time(step, repeats, device)[0]


def fp32_output(model, text, latents, sigma, shape) -> torch.Tensor:
    """The velocity computed in float32 from `model`'s weights, through a float32 copy."""
    from qimg.models.qwenimage21 import QwenImage21Transformer

    with torch.device("meta"):
        full = QwenImage21Transformer(model.cfg).eval()
    full.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
    prefix = full.encode_prefix(text.float(), torch.zeros(text.shape[1], dtype=torch.bool, device=text.device))
    out = full.denoise(latents.float(), sigma, prefix, shape, full.target_rope(prefix, shape))
    del full, prefix
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak bytes allocated above the level before the calls; 0 off CUDA)."""
    fn()  # warm-up
    sync(device)
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    return statistics.median(times), peak


def bench(name: str, repeats: int, device: torch.device, dtype: torch.dtype, compiled: bool | str = False,
          fused: bool = False) -> dict:
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cfg, side, n_text = CONFIGS[name]
    ref, ours = build(cfg, device, dtype)
    if fused:
        fuse_projections(ours)
    if compiled:
        from qimg.models.compiled import compile_transformer

        compile_transformer(ours, compiled)
    c = ours.cfg
    h = w = side // 16
    text = torch.randn(1, n_text, c.context_in_dim, device=device, dtype=dtype)
    latents = torch.randn(1, h * w, c.in_channels, device=device, dtype=dtype)
    sigma = torch.tensor([0.5], device=device)
    img_mask = torch.cat([torch.zeros(n_text, dtype=torch.bool), torch.ones(h * w // 4, dtype=torch.bool)])[None]
    kwargs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=sigma, img_shapes=[[(1, h, w)]],
                  img_mask=img_mask.to(device), return_dict=False)
    cache = QwenImage21KVCache(c.num_layers)
    with torch.inference_mode():
        ref(kv_cache=cache, kv_cache_mode="extract", **kwargs)
        prefix = ours.encode_prefix(text, torch.zeros(n_text, dtype=torch.bool, device=device))
        freqs = ours.target_rope(prefix, (h, w))
        ref_out = ref(kv_cache=cache, kv_cache_mode="cached", **kwargs)[0][:, -h * w:].float()
        our_out = ours.denoise(latents, sigma, prefix, (h, w), freqs).float()
        diff = (ref_out - our_out).abs().max().item()
        rel = ((ref_out - our_out).norm() / ref_out.norm()).item()
        ref_err = ours_err = None
        if dtype != torch.float32:  # both against float32 arithmetic on the same (rounded) weights
            exact = fp32_output(ours, text, latents, sigma, (h, w))
            ref_err = ((ref_out - exact).norm() / exact.norm()).item()
            ours_err = ((our_out - exact).norm() / exact.norm()).item()
        t_ref, t_ours, floor = [], [], []
        for _ in range(3):  # interleave rounds
            t_ref.append(median_time(lambda: ref(kv_cache=cache, kv_cache_mode="cached", **kwargs), repeats, device))
            t_ours.append(median_time(lambda: ours.denoise(latents, sigma, prefix, (h, w), freqs), repeats, device))
            floor.append(matmul_floor(c, h * w, n_text, repeats, device, dtype))
    params = sum(p.numel() for p in ours.parameters())
    (ref_s, ref_peak), (ours_s, ours_peak) = min(t_ref), min(t_ours)
    del ref, ours, cache, prefix, freqs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"config": name, "params": params, "image": f"{side}x{side}", "prompt_tokens": n_text,
            "reference_s": ref_s, "qimg_s": ours_s, "speedup": ref_s / ours_s, "max_abs_diff": diff,
            "rel_diff": rel, "reference_err_vs_fp32": ref_err, "qimg_err_vs_fp32": ours_err,
            "reference_peak_gib": ref_peak / 2**30, "qimg_peak_gib": ours_peak / 2**30,
            "matmul_floor_s": min(floor)}


def bench_v1(name: str, repeats: int, device: torch.device, dtype: torch.dtype, compiled: bool | str = False,
             fused: bool = False) -> dict:
    import diffusers

    from qimg.models.qwenimage import QwenImageConfig, QwenImageTransformer

    cfg, side, n_text = V1_CONFIGS[name]
    ref = reference(diffusers.QwenImageTransformer2DModel, cfg, device, dtype)
    with torch.device("meta"):
        ours = QwenImageTransformer(QwenImageConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    if fused:
        fuse_projections(ours)
    if compiled:
        from qimg.models.compiled import compile_transformer

        compile_transformer(ours, compiled)
    h = w = side // 16
    shapes = [(1, h, w)]
    text = torch.randn(1, n_text, cfg["joint_attention_dim"], device=device, dtype=dtype)
    latents = torch.randn(1, h * w, cfg["in_channels"], device=device, dtype=dtype)
    sigma = torch.tensor([0.5], device=device)
    kwargs = dict(hidden_states=latents, encoder_hidden_states=text, timestep=sigma, img_shapes=[shapes],
                  return_dict=False)
    with torch.inference_mode():
        freqs = ours.rope(shapes, n_text, device)
        ref_out = ref(**kwargs)[0].float()
        our_out = ours(latents, text, sigma, shapes, freqs=freqs).float()
        diff = (ref_out - our_out).abs().max().item()
        rel = ((ref_out - our_out).norm() / ref_out.norm()).item()
        t_ref, t_ours = [], []
        for _ in range(3):  # interleave rounds
            t_ref.append(median_time(lambda: ref(**kwargs), repeats, device))
            t_ours.append(median_time(lambda: ours(latents, text, sigma, shapes, freqs=freqs), repeats, device))
    params = sum(p.numel() for p in ours.parameters())
    (ref_s, ref_peak), (ours_s, ours_peak) = min(t_ref), min(t_ours)
    del ref, ours
    return {"config": name, "params": params, "image": f"{side}x{side}", "prompt_tokens": n_text,
            "reference_s": ref_s, "qimg_s": ours_s, "speedup": ref_s / ours_s, "max_abs_diff": diff,
            "rel_diff": rel, "reference_err_vs_fp32": None, "qimg_err_vs_fp32": None,
            "reference_peak_gib": ref_peak / 2**30, "qimg_peak_gib": ours_peak / 2**30}


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="tiny,medium,v1-tiny,v1-medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/step_time[-DEVICE].json)")
    parser.add_argument("--compile", nargs="?", const="blocks", default=False, choices=["blocks", "step"],
                        help="qimg's transformer compiled (qimg.models.compiled): its blocks (default) or whole step")
    parser.add_argument("--fused", action="store_true", help="qimg's projections fused (qimg.models.fused)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [(bench_v1 if name in V1_CONFIGS else bench)(name, args.repeats, device, dtype, args.compile,
                                                                 args.fused)
            for name in args.configs.split(",")]
    print(f"{'config':<9} {'params':>13} {'image':>9} {'text':>5} {'reference s':>12} {'qimg s':>9} "
          f"{'speed-up':>9} {'ref peak GiB':>12} {'qimg peak GiB':>13} {'max diff':>9} {'rel diff':>9} "
          f"{'ref err':>8} {'qimg err':>8} {'matmul floor s':>14}")
    for r in rows:
        print(f"{r['config']:<9} {r['params']:>13,} {r['image']:>9} {r['prompt_tokens']:>5} "
              f"{r['reference_s']:>12.4f} {r['qimg_s']:>9.4f} {r['speedup']:>8.2f}x {r['reference_peak_gib']:>12.2f} "
              f"{r['qimg_peak_gib']:>13.2f} {r['max_abs_diff']:>9.1e} {r['rel_diff']:>9.1e} "
              f"{fmt(r['reference_err_vs_fp32']):>8} {fmt(r['qimg_err_vs_fp32']):>8} "
              f"{'-' if r.get('matmul_floor_s') is None else format(r['matmul_floor_s'], '.4f'):>14}")
    suffix = {False: "", "blocks": "-compiled", "step": "-compiled-step"}[args.compile]
    suffix += "-fused" if args.fused else ""
    name = ("step_time" if device.type == "cpu" else f"step_time-{device.type}") + suffix + ".json"
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    out.write_text(json.dumps({"threads": args.threads, "device": args.device, "gpu": gpu, "dtype": args.dtype,
                               "compiled": args.compile, "fused": args.fused,
                               "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
