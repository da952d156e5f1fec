"""Test helpers (no tests here): random adapter files in the formats the community's tools write, and the reference
pipeline with LoRAs loaded by diffusers."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0, std: float = 0.1) -> dict:
    """{module: (down [r, in], up [out, r])}"""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, i, generator=g) * std, torch.randn(o, rank, generator=g) * std)
            for m, (o, i) in shapes.items()}


KEYS = {
    # format: (prefix, flat names, down name, up name)
    "peft": ("transformer.", False, "lora_A.weight", "lora_B.weight"),
    "peft-default": ("", False, "lora_A.default.weight", "lora_B.default.weight"),  # a bare PEFT model save
    "kohya": ("lora_unet_", True, "lora_down.weight", "lora_up.weight"),
    "comfy": ("diffusion_model.", False, "lora_down.weight", "lora_up.weight"),
    "comfy-ab": ("diffusion_model.", False, "lora_A.weight", "lora_B.weight"),
    "bare": ("", False, "lora_down.weight", "lora_up.weight"),
}


def write_lora(path: Path, lora: dict, fmt: str = "peft", alpha: float | None = None,
               metadata: dict | None = None) -> Path:
    prefix, flat, down_name, up_name = KEYS[fmt]
    sd = {}
    for module, (down, up) in lora.items():
        name = prefix + (module.replace(".", "_") if flat else module)
        sd[f"{name}.{down_name}"] = down.clone().contiguous()
        sd[f"{name}.{up_name}"] = up.clone().contiguous()
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path), metadata=metadata)
    return path


@contextlib.contextmanager
def reference_with(ref, loras: list[tuple[Path, float]]):
    """The diffusers pipeline `ref` with `loras` (path, scale) loaded as adapters; unloaded afterwards."""
    names = []
    try:
        for i, (path, _) in enumerate(loras):
            ref.load_lora_weights(str(path), adapter_name=f"a{i}")
            names.append(f"a{i}")
        ref.set_adapters(names, [scale for _, scale in loras])
        yield ref
    finally:
        if names:
            ref.unload_lora_weights()


@contextlib.contextmanager
def reference_with_deltas(ref, deltas: dict[str, torch.Tensor], scale: float):
    """The diffusers pipeline `ref` with `scale * delta` added to the named transformer weights; restored after."""
    saved = {}
    try:
        with torch.no_grad():
            for module, delta in deltas.items():
                weight = ref.transformer.get_submodule(module).weight
                saved[module] = weight.detach().clone()
                weight.add_(scale * delta)
        yield ref
    finally:
        with torch.no_grad():
            for module, weight in saved.items():
                ref.transformer.get_submodule(module).weight.copy_(weight)


def settings_sidecar(path: Path, settings: dict) -> None:
    path.with_suffix(".json").write_text(json.dumps(settings))
