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


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_gguf_module(factory: Callable[[], nn.Module], path: str | Path, *, dtype: torch.dtype,
                     device: torch.device | str, component: str = "transformer") -> nn.Module:
    path = Path(path)
    tensors = read_gguf(path)
    with torch.device("meta"):
        module = factory()
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or extra:
        what = []
        if missing:
            what.append(f"{len(missing)} of the {component}'s {len(expected)} tensors are missing ({_names(missing)})")
        if extra:
            what.append(f"{len(extra)} tensors are not the {component}'s ({_names(extra)})")
        raise CheckpointError(f"{path}: not this model's {component}: {'; '.join(what)}; is it a file for another "
                              f"family?")
    wrong = [(k, tensors[k].shape, shape) for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{path}: the file's {component} is another size than the folder's config: {k} is "
                              f"{list(got)} in the file, {list(want)} in the config ({len(wrong)} tensors differ)")
    quantized = {}
    for name, sub in module.named_modules():
        weight = tensors.get(f"{name}.weight")
        if isinstance(sub, nn.Linear) and weight is not None and weight.quantized:
            bias = tensors.get(f"{name}.bias")
            quantized[name] = QuantLinear(weight, None if bias is None else bias.dequantize(dtype), dtype)
    for name, layer in quantized.items():
        module.set_submodule(name, layer)
    kept = {f"{name}.{part}" for name in quantized for part in ("weight", "bias")}
    rest = {k: t.dequantize(dtype) for k, t in tensors.items() if k not in kept}
    module.load_state_dict(rest, strict=False, assign=True)
    with torch.device(device):
        module.apply(lambda m: getattr(m, "init_non_persistent_buffers", lambda: None)())
    module = module.to(device)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: these {component} tensors were not filled: {_names(left)}")
    return module.eval().requires_grad_(False)
