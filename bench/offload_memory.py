"""Peak GPU memory and time of a whole Qwen-Image-2.1 text-to-image run at the official sizes, with and without
`offload` (random weights: an 8B-class Qwen3-VL encoder, the 7.1B transformer and the official VAE, bfloat16).

    python bench/offload_memory.py [--sides 1024,2048] [--steps 4]
    python bench/offload_memory.py --small --device cpu     # a smoke run of the script itself at tiny sizes

The models are built on the GPU (initialising 8.8B weights on a CPU takes minutes) and moved to the CPU for the
offloaded runs. Nothing is read from disk but the shipped qimg-tiny's processor (its tokenizer and chat template). "peak" is
torch's high-water mark of allocated GPU memory over the whole call (encode, denoise, decode), "resident" what
stays allocated after it. Prints a table and writes bench/results/offload_memory.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qimg.loading.files import default_model_path, read_json
from qimg.models.conditioner import Qwen3VLConditioner
from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from qimg.models.vae21 import VAE21, VAE21Config
from qimg.pipelines.base import ModelInfo
from qimg.pipelines.placement import Placement
from qimg.pipelines.qwenimage21 import DEFAULTS, QwenImage21Pipeline
from qimg.sampling.schedule import SchedulerConfig

# Qwen3-VL-8B-class sizes (hidden 4096 matches the 2.1 transformer's context_in_dim)
TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936)
VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
              deepstack_visual_indexes=[8, 16, 24])
SMALL_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, vocab_size=151936)
SMALL_VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                    deepstack_visual_indexes=[0])
PROMPT = ("A poster for a summer jazz festival by the sea: a brass band on a wooden pier at sunset, the title "
          "\"SEASIDE JAZZ\" in large bold letters at the top, the dates and three headliners in a column on the "
          "right, gulls over the water, warm orange and deep blue tones, a clean modern layout. ") * 3


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module


def build_encoder(small: bool, dtype: torch.dtype, device: torch.device) -> Qwen3VLConditioner:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qimg.tiny.train import vision_token_ids

    processor = Qwen3VLConditioner.load(default_model_path(), dtype=torch.float32, device="cpu").processor
    text = dict(SMALL_TEXT if small else TEXT, max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20]
                                 if not small else [4, 6, 6], "mrope_interleaved": True})
    config = Qwen3VLConfig(text_config=text, vision_config=dict(SMALL_VISION if small else VISION, patch_size=16,
                                                                 spatial_merge_size=2, temporal_patch_size=2),
                           **vision_token_ids(processor.tokenizer), tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:  # initialising 8.8B weights is minutes on a CPU, seconds on a GPU
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return Qwen3VLConditioner(model.eval().requires_grad_(False), processor)


def build_transformer(small: bool, dtype: torch.dtype, device: torch.device) -> QwenImage21Transformer:
    cfg = QwenImage21Config(num_layers=2, attention_head_dim=32, num_attention_heads=2, axes_dims_rope=(8, 12, 12),
                            context_in_dim=64) if small else QwenImage21Config()
    with torch.device("meta"):
        model = QwenImage21Transformer(cfg).to(dtype)
    return randomize(model.to_empty(device=device)).eval().requires_grad_(False)


def run(pipe: QwenImage21Pipeline, side: int, steps: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe.generate(PROMPT, width=side, height=side, steps=steps, seed=0)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    gib = 2**30
    return {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / gib if cuda else None,
            "resident_gib": torch.cuda.memory_allocated() / gib if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sides", default="1024,2048")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    conditioner = build_encoder(args.small, dtype, device)
    transformer = build_transformer(args.small, dtype, device)
    with device:
        vae = randomize(VAE21(VAE21Config(base_dim=16, decoder_base_dim=16) if args.small else VAE21Config()))
    vae = vae.to(dtype).eval().requires_grad_(False)
    scheduler = SchedulerConfig.from_dict(read_json(default_model_path() / "scheduler" / "scheduler_config.json"))
    sizes = {name: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30
             for name, m in (("encoder", conditioner.model), ("transformer", transformer), ("vae", vae))}
    rows = []
    for offload in (False, True):
        if offload:  # the offloaded weights wait in CPU memory
            conditioner.model.to("cpu")
            transformer.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        placement = Placement.of_pipeline(device, offload, conditioner, transformer)
        pipe = QwenImage21Pipeline(transformer, vae, conditioner, scheduler, defaults=DEFAULTS, placement=placement,
                                   info=ModelInfo(Path("random"), "QwenImage21Pipeline", dtype, device))
        for side in (int(s) for s in args.sides.split(",")):
            pipe.generate(PROMPT, width=side, height=side, steps=1, seed=0)  # warm-up
            rows.append({"offload": offload, "side": side, "steps": args.steps, **run(pipe, side, args.steps, device)})
            print(rows[-1], flush=True)
        placement.release()
    print("weights (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))
    print(f"{'offload':>8} {'image':>10} {'steps':>5} {'seconds':>8} {'peak GiB':>9} {'resident GiB':>12}")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        resident = "-" if r["resident_gib"] is None else f"{r['resident_gib']:.2f}"
        print(f"{str(r['offload']):>8} {r['side']:>5}x{r['side']:<4} {r['steps']:>5} {r['seconds']:>8.2f} "
              f"{peak:>9} {resident:>12}")
    out = Path(__file__).parent / "results" / "offload_memory.json"
    if not args.small:
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name() if device.type ==
                                   "cuda" else None, "torch": torch.__version__, "weights_gib": sizes, "rows": rows},
                                  indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
