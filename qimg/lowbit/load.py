"""A component built from one GGUF file: its Linear weights stay quantised (`QuantLinear`), every other tensor is
dequantised into the run's dtype. The file must hold exactly the module's state-dict keys at the module's shapes
(the folder's config decides the module): anything else is refused naming the keys."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qimg.errors import CheckpointError
from qimg.lowbit.gguf_file import read_gguf
from qimg.lowbit.layers import QuantLinear


def some_names(keys, limit: int = 8) -> str:
    """The first `limit` of `keys`, sorted, and how many more (for error messages)."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_keys(path: Path, expected: dict[str, tuple], found: dict[str, tuple], component: str,
               optional: Callable[[str], bool] = lambda key: False) -> None:
    """The file holds exactly the module's keys at its shapes (those `optional` names may be absent), else
    CheckpointError naming the difference."""
    missing = {k for k in set(expected) - set(found) if not optional(k)}
    extra = set(found) - set(expected)
    if missing or extra:
        what = []
        if missing:
            what.append(f"{len(missing)} of the {component}'s {len(expected)} tensors are missing "
                        f"({some_names(missing)})")
        if extra:
            what.append(f"{len(extra)} tensors are not the {component}'s ({some_names(extra)})")
        raise CheckpointError(f"{path}: not this model's {component}: {'; '.join(what)}; is it a file for another "
                              f"family?")
    wrong = [(k, found[k], shape) for k, shape in expected.items()
             if k in found and tuple(found[k]) != tuple(shape)]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{path}: the file's {component} is another size than the folder's config: {k} is "
                              f"{list(got)} in the file, {list(want)} in the config ({len(wrong)} tensors differ)")


def meta_module(factory: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, tuple], set[str]]:
    """The module the folder's config makes, on the meta device, its state-dict shapes and its nn.Linear names."""
    with torch.device("meta"):
        module = factory()
    linears = {name for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}
    return module, {k: tuple(v.shape) for k, v in module.state_dict().items()}, linears


def build(module: nn.Module, layers: dict[str, nn.Module], rest: dict[str, torch.Tensor], path: Path,
          device, component: str) -> nn.Module:
    """`module` (on meta) with `layers` (name -> quantised layer) swapped in and `rest` assigned."""
    for name, layer in layers.items():
        module.set_submodule(name, layer)
    module.load_state_dict(rest, strict=False, assign=True)
    with torch.device(device):
        module.apply(lambda m: getattr(m, "init_non_persistent_buffers", lambda: None)())
    module = module.to(device)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: these {component} tensors were not filled: {some_names(left)}")
    return module.eval().requires_grad_(False)


def load_gguf_module(factory: Callable[[], nn.Module], path: str | Path, *, dtype: torch.dtype,
                     device: torch.device | str, component: str = "transformer") -> nn.Module:
    path = Path(path)
    tensors = read_gguf(path)
    module, expected, linears = meta_module(factory)
    check_keys(path, expected, {k: t.shape for k, t in tensors.items()}, component)
    layers = {}
    for name in linears:
        weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
        if weight is not None and weight.quantized:
            layers[name] = QuantLinear(weight, None if bias is None else bias.dequantize(dtype), dtype)
    kept = {f"{name}.{part}" for name in layers for part in ("weight", "bias")}
    rest = {k: t.dequantize(dtype) for k, t in tensors.items() if k not in kept}
    return build(module, layers, rest, path, device, component)


def load_safetensors_module(factory: Callable[[], nn.Module], path: str | Path, *, dtype: torch.dtype,
                            device: torch.device | str, component: str = "transformer", prefixes=None,
                            keep_quantized: bool = True) -> nn.Module:
    """A single .safetensors file in the diffusers or ComfyUI key layout (`prefixes`, default the transformer's
    `model.diffusion_model.` / `diffusion_model.`, are stripped), in any float dtype; float8_e4m3fn and int8 Linear
    weights stay in one byte per weight (with their file's `scale_weight`, "scaled fp8", or 1; with
    `keep_quantized` False they are dequantised), every other tensor is cast to the run's dtype (the file's
    memory-mapped tensors are used as they are when the dtypes agree)."""
    from qimg.loading.single_files import _unprefixed, split_scaled
    from qimg.loading.weights import open_state_dict
    from qimg.lowbit.gguf_file import PREFIXES
    from qimg.lowbit.weight_only import ScaledLinear

    path = Path(path)
    tensors, scales = split_scaled(_unprefixed(open_state_dict(path), PREFIXES if prefixes is None else prefixes))
    module, expected, linears = meta_module(factory)
    check_keys(path, expected, {k: tuple(t.shape) for k, t in tensors.items()}, component)
    stray = sorted(set(scales) - {k[: -len(".weight")] for k in tensors if k.endswith(".weight")})
    if stray:
        raise CheckpointError(f"{path}: scale_weight for tensors the file does not hold: {some_names(stray)}")
    layers = {}
    for name in linears:
        weight, bias = tensors[f"{name}.weight"], tensors.get(f"{name}.bias")
        if keep_quantized and weight.dtype in (torch.float8_e4m3fn, torch.int8):
            scale = scales.get(name, torch.ones(()))
            layers[name] = ScaledLinear.from_stored(weight, scale, None if bias is None else bias.to(dtype), dtype)
    kept = {f"{name}.{part}" for name in layers for part in ("weight", "bias")}
    rest = {}
    for key, tensor in tensors.items():
        if key in kept:
            continue
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):  # not kept quantised: upcast
            owner = key.rsplit(".", 1)[0]
            scale = scales.get(owner, torch.ones(())).float()
            scale = scale.reshape(-1, *[1] * (tensor.ndim - 1)) if scale.numel() > 1 else scale  # per output row
            tensor = tensor.float() * scale
        rest[key] = tensor.to(dtype)
    return build(module, layers, rest, path, device, component)
