"""Where a pipeline's big components (the condition encoder and the transformer) live while it runs.

Without offload every component stays on the pipeline's device. With offload the big ones wait in CPU memory and
`use(module)` moves one onto the device for the phase that needs it, sending the other back first, so the GPU
holds one big component at a time: the 7B 2.x transformer in bfloat16 (14.2 GB) never shares the card with the
8B Qwen3-VL encoder. The VAE is small and stays on the device. Sending a module back copies nothing: each weight's
CPU tensor is kept and put back in place, so the cost is one host-to-device copy per phase.
"""

from __future__ import annotations

import torch
from torch import nn


def weights_home(device: torch.device, offload: bool) -> torch.device:
    """Where a pipeline loads its big components: the CPU when they are offloaded, else `device` (offload on a CPU
    device does nothing). A pipeline offloads exactly when this differs from `device`."""
    return torch.device("cpu") if offload and device.type != "cpu" else device


class Placement:
    def __init__(self, device: torch.device, offloaded: list[nn.Module] = ()):
        self.device = torch.device(device)
        self._homes = {id(m): _home_tensors(m) for m in offloaded}
        self._resident: nn.Module | None = None

    @classmethod
    def of_pipeline(cls, device: torch.device, offload: bool, conditioner, transformer) -> "Placement":
        """A pipeline's placement: with `offload`, its big components (the condition encoder's `encoder` part
        and the transformer) move; without, nothing does."""
        return cls(device, [conditioner.encoder, transformer] if offload else [])

    @property
    def offload(self) -> bool:
        return bool(self._homes)

    def use(self, module: nn.Module) -> None:
        """Make `module` resident on the device (a no-op without offload or when it already is)."""
        if id(module) not in self._homes or self._resident is module:
            return
        if self._resident is not None:
            _put(self._homes[id(self._resident)], None)
        _put(self._homes[id(module)], self.device)
        self._resident = module

    def release(self) -> None:
        """Send the resident module back to the CPU (between jobs, so that an idle server holds no weights)."""
        if self._resident is not None:
            _put(self._homes[id(self._resident)], None)
            self._resident = None


def _home_tensors(module: nn.Module) -> list[tuple[list, torch.Tensor, bool]]:
    """For every distinct parameter and buffer: (the (table, name) places it sits in, its CPU tensor, whether it
    is a parameter). A tied weight is one entry with several places, so it stays tied on every device."""
    entries: dict[int, tuple[list, torch.Tensor, bool]] = {}
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                if t.device.type != "cpu":
                    raise ValueError(f"offloaded weights must start on the CPU; {name} is on {t.device}")
                place = entries.setdefault(id(t), ([], t.detach(), isinstance(t, nn.Parameter)))[0]
                place.append((table, name))
    return list(entries.values())


def _put(homes: list[tuple[list, torch.Tensor, bool]], device: torch.device | None) -> None:
    """Point every parameter and buffer at its CPU tensor (device None) or at a copy of it on `device`."""
    for places, home, is_parameter in homes:
        value = home if device is None else home.to(device, non_blocking=True)
        if is_parameter:
            value = nn.Parameter(value, requires_grad=False)
        for table, name in places:
            table[name] = value
