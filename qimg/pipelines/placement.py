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
    def __init__(self, device: torch.device, offloaded: list[nn.Module] = (), streamer: "BlockStreamer | None" = None):
        self.device = torch.device(device)
        self._homes = {id(m): _home_tensors(m) for m in offloaded}
        self._resident: nn.Module | None = None
        self.streamer = streamer

    @classmethod
    def of_pipeline(cls, device: torch.device, offload, conditioner, transformer) -> "Placement":
        """A pipeline's placement: with `offload` ("model" or True), its big components (the condition encoder's
        `encoder` part and the transformer) move; with "blocks", the encoder moves and the transformer's blocks
        stream (`BlockStreamer`; its other layers stay on the device); without, nothing does."""
        if offload == "blocks":
            for name, child in transformer.named_children():
                if name != "transformer_blocks":
                    child.to(device)
            return cls(device, [conditioner.encoder], BlockStreamer(transformer.transformer_blocks, device))
        return cls(device, [conditioner.encoder, transformer] if offload else [])

    @property
    def offload(self) -> bool:
        return bool(self._homes) or self.streamer is not None

    @property
    def mode(self) -> str | None:
        """"model" (whole components move), "blocks" (the transformer's blocks stream) or None."""
        if self.streamer is not None:
            return "blocks"
        return "model" if self._homes else None

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
        if self.streamer is not None:
            self.streamer.release()

    def close(self) -> None:
        """Before the placement is replaced: everything back home, the block streamer's hooks removed."""
        self.release()
        if self.streamer is not None:
            self.streamer.close()


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


def _put(homes: list[tuple[list, torch.Tensor, bool]], device: torch.device | None, used_on=None) -> None:
    """Point every parameter and buffer at its CPU tensor (device None) or at a copy of it on `device`; `used_on`:
    the CUDA stream that will read copies made on another one (so that their memory is not reused too early)."""
    for places, home, is_parameter in homes:
        value = home if device is None else home.to(device, non_blocking=True)
        if used_on is not None and device is not None:
            value.record_stream(used_on)
        if is_parameter:
            value = nn.Parameter(value, requires_grad=False)
        for table, name in places:
            table[name] = value


class BlockStreamer:
    """`--offload blocks`: a transformer's blocks wait in (pinned) CPU memory and each is copied onto the device
    just ahead of its use, on a side stream, so that the device holds `ahead + 1` blocks at a time. Before block i
    runs: wait for its copy, drop the blocks outside i..i+ahead (their places point at the CPU tensors again), start
    copying the next `ahead` blocks (wrapping round: the next model call starts again at block 0). A block a step
    cache skips is never waited for, only dropped later."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, ahead: int = 2):
        self.device, self.ahead, self.count = torch.device(device), ahead, len(blocks)
        cuda = self.device.type == "cuda"
        self.homes = [_home_tensors(block) for block in blocks]
        if cuda:  # page-locked host memory: copies that overlap compute
            self.homes = [[(places, home.pin_memory(), p) for places, home, p in entries] for entries in self.homes]
            for entries in self.homes:
                _put(entries, None)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.resident: dict[int, object] = {}  # block index -> the copy's CUDA event (None off CUDA)
        self.handles = [block.register_forward_pre_hook(lambda module, args, i=i: self.before(i))
                        for i, block in enumerate(blocks)]

    def before(self, index: int) -> None:
        self.fetch(index)
        if self.stream is not None and self.resident[index] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.resident[index])
        window = {(index + k) % self.count for k in range(self.ahead + 1)}
        for other in [i for i in self.resident if i not in window]:
            self.drop(other)
        for k in range(1, self.ahead + 1):
            self.fetch((index + k) % self.count)

    def fetch(self, index: int) -> None:
        if index in self.resident:
            return
        if self.stream is None:
            _put(self.homes[index], self.device)
            self.resident[index] = None
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            _put(self.homes[index], self.device, used_on=main)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.resident[index] = event

    def drop(self, index: int) -> None:
        _put(self.homes[index], None)
        del self.resident[index]

    def release(self) -> None:
        """Every block back in CPU memory (between jobs)."""
        for index in list(self.resident):
            self.drop(index)

    def close(self) -> None:
        self.release()
        for handle in self.handles:
            handle.remove()
