"""Fused projections: Linear layers that read the same input (an attention's q/k/v, a SwiGLU's gate and up)
multiplied as one matrix, one matrix product instead of several.

`fuse_projections(model)` gives each such group one weight tensor (and one bias) whose rows are the layers' own
parameters: each layer's parameter becomes a view of its rows, so the checkpoint's keys, `state_dict()` and the
memory stay as they were, and a LoRA merged in place reaches the fused weight through the views. A group runs fused
while every layer still is a plain `nn.Linear` whose parameters are those views, without hooks: an unfused
LoRA's hook pauses it; a LoRA that replaced a weight, a quantised layer or a move to another device or dtype ends it
(the fused copy is dropped) and the group's layers run one by one, so nothing is ever stale. The pipeline fuses again
after its adapters change. Under `torch.compile` the layers also run one by one (the check reads
data pointers, which a graph cannot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FUSED = "_fused_group"  # on a group's first layer: (weight, bias or None, output sizes)


def fuse_linears(layers) -> bool:
    """Give `layers` (plain Linears with one input size, dtype and device) one shared weight; False when they
    cannot share one (nothing changes then)."""
    layers = list(layers)
    if len(layers) < 2 or any(type(layer) is not nn.Linear for layer in layers):
        return False
    group = getattr(layers[0], FUSED, None)
    if group is not None and _shares(layers, group):
        return True  # already fused: nothing to copy
    weights = [layer.weight for layer in layers]
    if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1 or weights[0].device.type == "meta":
        return False
    with_bias = [layer.bias is not None for layer in layers]
    if any(with_bias) and not all(with_bias):
        return False
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = torch.cat([layer.bias.detach() for layer in layers]) if all(with_bias) else None
    row = 0
    for layer in layers:
        rows = slice(row, row + layer.out_features)
        layer.weight = nn.Parameter(weight[rows], requires_grad=layer.weight.requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias[rows], requires_grad=layer.bias.requires_grad)
        row += layer.out_features
    setattr(layers[0], FUSED, (weight, bias, [layer.out_features for layer in layers]))
    return True


def fused_group(layers):
    """(weight, bias, sizes) while `layers` still share their fused weight unchanged and run as plain Linears
    (no hooks, not under torch.compile); else None."""
    group = getattr(layers[0], FUSED, None)
    if group is None or torch.compiler.is_compiling():
        return None
    if any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers):
        return None
    return group if _shares(layers, group) else None


def _shares(layers, group) -> bool:
    """Whether the layers' parameters are still the group's rows; when not (a replaced weight, a move), the group
    is forgotten, so a stale copy holds no memory (`fuse_projections` makes a new one)."""
    weight, bias, sizes = group
    if len(sizes) != len(layers):
        delattr(layers[0], FUSED)
        return False
    row, width = 0, weight.stride(0) * weight.element_size()
    for layer, size in zip(layers, sizes):
        shared = type(layer) is nn.Linear and layer.weight.shape[0] == size \
            and layer.weight.data_ptr() == weight.data_ptr() + row * width \
            and (bias is None or (layer.bias is not None
                                  and layer.bias.data_ptr() == bias.data_ptr() + row * bias.element_size()))
        if not shared:
            delattr(layers[0], FUSED)
            return False
        row += size
    return True


def linears(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, as one product when the layers are fused."""
    group = fused_group(layers) if len(layers) > 1 else None
    if group is None:
        return [layer(x) for layer in layers]
    weight, bias, sizes = group
    return list(F.linear(x, weight, bias).split(sizes, dim=-1))


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group `model`'s modules name in `fused_groups()` (again after their weights were replaced:
    groups still fused copy nothing); the number of groups fused."""
    count = 0
    for module in model.modules():
        for group in getattr(module, "fused_groups", lambda: ())():
            count += fuse_linears(group)
    return count
