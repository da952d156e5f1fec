"""Adapters on one Linear layer, without changing the layer or its state-dict keys.

An adapted Linear gets a child `adapters` (an `AdapterSlot`, whose tensors are non-persistent buffers: they move
with the model and stay out of its state dict) and, while some active adapter is unfused, one forward hook that adds
their outputs (a layer whose adapters are all fused or inactive runs as a plain Linear, fused projections
included). Fusing replaces the layer's weight (and bias) by new tensors `W0 + sum(scale * dW)`; the original tensors
are kept (on the CPU: a memory-mapped checkpoint costs no memory) and put back on unfusing, so the base weights come
back bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from qimg.adapters.deltas import Delta


class AdapterSlot(nn.Module):
    def __init__(self):
        super().__init__()
        self.kinds: dict[str, Delta] = {}  # adapter -> its delta (tensors live in the buffers below)
        self.keys: dict[str, str] = {}  # adapter -> the prefix of its buffers' names (any adapter name is allowed)
        self._views: dict[str, tuple] = {}  # adapter -> (delta on the current buffers, those buffers)
        self._next = 0
        self.scales: dict[str, float] = {}  # active adapters and their user scales
        self.fused: dict[str, float] = {}  # what is merged into the layer's weight now
        self.original: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- deltas ------------------------------------------------------------------------------------------------
    def add(self, name: str, delta: Delta) -> None:
        self.remove(name)
        key = self.keys[name] = f"adapter{self._next}"
        self._next += 1
        for role, tensor in delta.tensors().items():
            self.register_buffer(f"{key}_{role}", tensor, persistent=False)
        self.kinds[name] = delta

    def remove(self, name: str) -> None:
        delta = self.kinds.pop(name, None)
        self._views.pop(name, None)
        if delta is not None:
            key = self.keys.pop(name)
            for role in delta.tensors():
                delattr(self, f"{key}_{role}")
        self.scales.pop(name, None)

    def delta(self, name: str) -> Delta:
        """The delta of `name` on this slot's current buffers (they move with the model; rebuilt when they do)."""
        kind, key = self.kinds[name], self.keys[name]
        tensors = {role: self._buffers[f"{key}_{role}"] for role in kind.tensors()}
        cached = self._views.get(name)
        if cached is None or any(cached[1][r] is not t for r, t in tensors.items()):
            cached = self._views[name] = (kind.with_tensors(tensors), tensors)
        return cached[0]

    # -- forward -----------------------------------------------------------------------------------------------
    def unfused(self) -> dict[str, float]:
        return {n: s for n, s in self.scales.items() if n not in self.fused}

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        for name, scale in self.unfused().items():
            out = out + scale * self.delta(name).apply(x)
        return out

    # -- fusing ------------------------------------------------------------------------------------------------
    def fuse(self, linear: nn.Linear) -> None:
        """Merge every active adapter into `linear`'s weight (replacing what was merged before)."""
        self.unfuse(linear)
        if not self.scales:
            return
        weight, bias = linear.weight, linear.bias
        self.original = (keep(weight), None if bias is None else keep(bias))
        delta_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        delta_b = None
        for name, scale in self.scales.items():
            delta = self.delta(name)
            delta_w += scale * delta.weight().to(weight.device)
            extra = delta.bias()
            if extra is not None:
                delta_b = (0 if delta_b is None else delta_b) + scale * extra.to(weight.device)
        linear.weight = nn.Parameter((weight.float() + delta_w).to(weight.dtype), requires_grad=False)
        if delta_b is not None:
            base = bias.float() if bias is not None else torch.zeros_like(delta_b)
            linear.bias = nn.Parameter((base + delta_b).to(weight.dtype), requires_grad=False)
        self.fused = dict(self.scales)

    def unfuse(self, linear: nn.Linear) -> None:
        if self.original is None:
            return
        weight, bias = self.original
        device = linear.weight.device
        linear.weight = nn.Parameter(weight if weight.device == device else weight.to(device), requires_grad=False)
        linear.bias = None if bias is None else nn.Parameter(bias if bias.device == device else bias.to(device),
                                                             requires_grad=False)
        self.original, self.fused = None, {}


def keep(tensor: torch.Tensor) -> torch.Tensor:
    """The original tensor, kept for unfusing: itself on the CPU, a CPU copy of it elsewhere (exact either way)."""
    return tensor.detach() if tensor.device.type == "cpu" else tensor.detach().to("cpu")


def _hook(linear: nn.Linear, args, output):
    slot = linear.adapters
    if not slot.unfused():
        return None
    return slot(args[0], output)


def slot_of(linear: nn.Linear) -> AdapterSlot:
    """The layer's slot, created the first time."""
    slot = getattr(linear, "adapters", None)
    if slot is None:
        slot = linear.adapters = AdapterSlot()
    return slot


def sync_hook(linear: nn.Linear) -> None:
    """Hook the layer exactly while its slot has active adapters that are not fused into its weight."""
    hook, needed = getattr(linear, "_adapter_hook", None), bool(linear.adapters.unfused())
    if needed and hook is None:
        linear._adapter_hook = linear.register_forward_hook(_hook)
    elif not needed and hook is not None:
        hook.remove()
        del linear._adapter_hook


def drop_slot(linear: nn.Linear) -> None:
    """Unfuse and remove every adapter, the slot and its hook: the layer is as it was loaded."""
    slot = getattr(linear, "adapters", None)
    if slot is None:
        return
    slot.unfuse(linear)
    slot.scales = {}
    sync_hook(linear)
    del linear.adapters
