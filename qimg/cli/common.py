"""What the sub-commands share: the model and sampling flags (turned into `LoadOptions` and the sampling fields of
the request options, validated before any model is loaded), pictures in and out, the progress bar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qimg.errors import InputError

OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}") from None
    return w, h


def parse_sigmas(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sigmas must be numbers separated by commas such as 1.0,0.75,0.5,0.25, "
                                         f"got {text!r}") from None


def parse_scheduler_config(text: str) -> dict:
    """A scheduler_config.json file, or the JSON object itself."""
    source = text
    if not text.lstrip().startswith("{"):
        try:
            source = Path(text).read_text()
        except OSError as err:
            raise argparse.ArgumentTypeError(f"scheduler config {text!r}: {err.strerror or err}") from None
    try:
        value = json.loads(source)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"scheduler config {text!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"scheduler config must be a JSON object, got {value!r}")
    return value


def model_args(p: argparse.ArgumentParser, default: str = "qimg-tiny") -> None:
    p.add_argument("--model", default=None, help=f"checkpoint folder, cached repo id or embedded model name "
                                                  f"(default: the embedded {default})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights and compute (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None,
                   help="where to run (default: CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--offload", nargs="?", const="model", default=False, choices=["model", "blocks"],
                   help="keep the encoder and the transformer in CPU memory, each moved to the GPU for its phase "
                        "(GPUs too small to hold both; slower); --offload blocks: the transformer's blocks stream "
                        "onto the GPU a few at a time instead (smaller still)")
    p.add_argument("--attention", default="sdpa", metavar="NAME",
                   help="attention backend: sdpa (default), math (explicit softmax, a check on the fused kernels), "
                        "flash (FlashAttention) or sage (SageAttention) on a CUDA GPU with that package installed")
    lora_args(p, default_mode="fused")
    p.add_argument("--download", action="store_true",
                   help="fetch --model from the Hugging Face Hub first when it is not cached (else qimg stays "
                        "offline)")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="store the transformer's Linear weights in 8 bits (weight-only, per-row scales; dequantised "
                        "per layer as it runs): about half of bfloat16's memory")
    p.add_argument("--no-batch-guidance", dest="batch_guidance", action="store_false",
                   help="run the two guidance branches as two transformer calls (half the activation memory; the "
                        "default runs them as one batch, same pictures)")
    p.add_argument("--text-encoder", default=None, metavar="FILE",
                   help="replace the model's condition encoder weights with one .safetensors file (transformers or "
                        "ComfyUI keys; bf16, fp16, scaled fp8: fp8 weights stay fp8)")
    p.add_argument("--vae", default=None, metavar="FILE", help="replace the model's VAE weights with one .safetensors "
                                                               "file (diffusers keys, optionally prefixed)")
    p.add_argument("--quantize-encoder", choices=["int8", "fp8"], default=None,
                   help="store the condition encoder's Linear weights in 8 bits (weight-only): about half of bfloat16")
    add_compile_flag(p, "picture")
    p.add_argument("--transformer", default=None, metavar="FILE",
                   help="replace the model's transformer weights with one file: .gguf (Q8_0, Q4_0/1, Q5_0/1, "
                        "Q2_K-Q6_K, F16, BF16, F32) or .safetensors (diffusers or ComfyUI keys; bf16, fp16, fp8 "
                        "e4m3fn, scaled fp8); quantised Linear weights stay quantised until used")


def lora_args(p: argparse.ArgumentParser, default_mode: str) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (diffusers/PEFT, kohya, ComfyUI, LoKr, LoHa or diff .safetensors) at SCALE "
                        "(default 1); repeatable, they stack")
    p.add_argument("--lora-partial", action="store_true",
                   help="load a LoRA whose layers only partly match the model (refused otherwise)")
    p.add_argument("--lora-mode", choices=["fused", "unfused"], default=default_mode,
                   help=f"merge LoRAs into the weights (full speed) or run them beside them (default {default_mode})")


def parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", default=None, metavar="ulysses=U,cfg=C",
                   help="make each picture on U x C ranks started by torchrun: cfg=2 runs the two guidance branches "
                        "side by side, ulysses=U shares each step's image tokens (U must divide the attention heads)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="start N ranks here (one per GPU; with --device cpu, N CPU processes) and make each picture "
                        "on all of them (default split: --parallel ulysses=N)")


def load_options(args, task: str | None = None):
    from qimg.options import LoadOptions

    return LoadOptions(model=args.model, task=task, dtype=args.dtype, device=args.device, offload=args.offload,
                       attention=args.attention, loras=tuple(args.lora), lora_mode=args.lora_mode,
                       lora_partial=args.lora_partial, download=args.download, transformer=args.transformer,
                       quantize=args.quantize, batch_guidance=args.batch_guidance, text_encoder=args.text_encoder,
                       vae=args.vae, quantize_encoder=args.quantize_encoder, compile=args.compile,
                       parallel=getattr(args, "parallel", None))


def main_rank(args) -> bool:
    """Whether this process prints and writes: always on one process; rank 0 of a parallel run."""
    import os

    return not getattr(args, "parallel", None) or os.environ.get("RANK", "0") == "0"


def describe_loras(pipe) -> str:
    """What the CLI says about the LoRAs it loaded (and the preset they brought)."""
    loras = pipe.describe().get("loras") or []
    return "".join(f"LoRA {a['name']} at {a['scale']:g}: {a['format']}, {a['layers']} of {a['of']} layers"
                   f"{', fused' if a['fused'] else ''}\n" for a in loras)


def sampling_args(p: argparse.ArgumentParser) -> None:
    """Steps, seed, guidance, schedule and sampler: the fields every request kind shares."""
    from qimg.sampling.presets import PRESETS
    from qimg.sampling.samplers import SAMPLERS

    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="fixes the noise (default: random, printed)")
    p.add_argument("--negative-prompt", default=None, help="what guidance steers away from (with --cfg > 1)")
    p.add_argument("--cfg", type=float, default=None, help="true CFG scale (>1 turns guidance on)")
    p.add_argument("--cfg-normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="rescale guided predictions to the conditional norm (default: the model's way)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="euler", help="default euler")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a few-step recipe: its scheduler, steps, sigmas and cfg (default: detected from the "
                        "model's name)")
    p.add_argument("--sigmas", type=parse_sigmas, default=None, metavar="S1,S2,...",
                   help="explicit noise levels in (0, 1], without the final 0 (their count is the step count)")
    p.add_argument("--scheduler-config", type=parse_scheduler_config, default=None, metavar="FILE|JSON",
                   help="scheduler_config.json keys that override the model's")
    p.add_argument("--shift", type=float, default=None, help="a constant timestep shift at every resolution")
    p.add_argument("--cache", default=None, metavar="NAME[:THRESHOLD]",
                   help="a step cache: fbcache (first-block cache, default threshold 0.2) or magcache (residual "
                        "magnitudes, default 0.12), optionally NAME:THRESHOLD (higher skips more); off by default")


def sampling_fields(args) -> dict:
    return dict(steps=args.steps, seed=args.seed, negative_prompt=args.negative_prompt, cfg=args.cfg,
                cfg_normalize=args.cfg_normalize, sampler=args.sampler, preset=args.preset, sigmas=args.sigmas,
                scheduler=args.scheduler_config, shift=args.shift, cache=args.cache)


def open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InputError(f"{path} is not a readable picture: {err}") from None


def check_output(path: str, suffixes=OUTPUT_SUFFIXES) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise InputError(f"output {path!r} has suffix {out.suffix or '(none)'!r}; use one of {list(suffixes)}")
    if not out.parent.exists():
        raise InputError(f"output folder does not exist: {out.parent}")
    return out


class ProgressBar:
    """A tqdm bar on stderr for the denoising stage."""

    def __init__(self, quiet: bool, desc: str = "denoise"):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, event) -> None:
        if self.quiet or event.stage != "denoise":
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event.total, desc=self.desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.update(event.step - self.bar.n)
        if event.step >= event.total:
            self.bar.close()


def add_compile_flag(p: argparse.ArgumentParser, unit: str) -> None:
    p.add_argument("--compile", action="store_const", const="blocks", default=False,
                   help=f"torch.compile the transformer's blocks (quick to compile at any size); the first {unit} at "
                        f"a size waits for the compiler")
    p.add_argument("--compile-step", dest="compile", action="store_const", const="step",
                   help="torch.compile the transformer's whole step instead (fastest for small models and CPUs; one "
                        "process; longer to compile)")
