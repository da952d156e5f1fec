"""The ranks of a parallel run and their process groups.

Rank r is in guidance group `r // U` (which branch it computes: 0 the conditional, 1 the unconditional) and at
position `r % U` of its Ulysses group (which share of the image tokens it holds). The process group comes from
`torch.distributed`: started here from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) with NCCL for CUDA
tensors and gloo for CPU ones, or taken as the caller already started it.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from qimg.errors import InputError
from qimg.parallel.config import ParallelConfig

BRANCHES = ("cond", "uncond")


def launched() -> bool:
    """Whether this process was started by torchrun (or `qimg ... --gpus N`)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device(device: torch.device) -> torch.device:
    """This rank's device: `cuda` becomes `cuda:LOCAL_RANK`; other devices are used as they are."""
    if device.type != "cuda" or device.index is not None:
        return device
    count = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))
    if local >= count:
        raise InputError(f"rank {local} on this machine needs cuda:{local}, but torch sees {count} CUDA device(s)")
    return torch.device("cuda", local)


def start_processes(device: torch.device) -> None:
    """Join the run's process group (a no-op when the caller has started it)."""
    if dist.is_initialized():
        return
    if not launched():
        raise InputError("parallel runs need one process per rank: start them with torchrun (`torchrun "
                         "--nproc-per-node N --no-python qimg generate ... --parallel ...`) or `qimg generate --gpus "
                         "N`; RANK and WORLD_SIZE are not set")
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")


def join(config: ParallelConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.device, "Mesh"]:
    """This process's device and place in the run described by `config` (joining the process group first)."""
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start_processes(device)
    return device, Mesh(config, device, dtype)


def leave() -> None:
    """Leave the process group (at the end of a parallel run's process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Mesh:
    """This rank's place in a `ulysses x cfg` run and the groups it talks to."""

    def __init__(self, config: ParallelConfig, device: torch.device, dtype: torch.dtype):
        self.config, self.device = config, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != config.world:
            raise InputError(f"parallel {config} needs {config.world} processes (ulysses {config.ulysses} x cfg "
                             f"{config.cfg}); this run has {self.world}")
        self.cfg_rank, self.seq_rank = divmod(self.rank, config.ulysses)
        self.control = dist.new_group(backend="gloo")  # CPU tensors: the checks below
        self.check_same(device, dtype)
        # every rank creates every group, in the same order (torch.distributed's rule)
        for c in range(config.cfg):
            group = dist.new_group([c * config.ulysses + u for u in range(config.ulysses)])
            if c == self.cfg_rank:
                self.seq_group = group
        for u in range(config.ulysses):
            group = dist.new_group([c * config.ulysses + u for c in range(config.cfg)])
            if u == self.seq_rank:
                self.cfg_group = group

    def check_same(self, device: torch.device, dtype: torch.dtype) -> None:
        """Refuse ranks on mixed kinds of device or dtypes, naming each rank's."""
        mine = torch.tensor([_code(_DEVICE_NAMES, device.type), _code(_DTYPES, dtype)])
        everyone = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=self.control)
        if any(not torch.equal(t, everyone[0]) for t in everyone):
            names = ", ".join(f"rank {r}: {_named(_DEVICE_NAMES, int(t[0]))} {_named(_DTYPES, int(t[1]))}"
                              for r, t in enumerate(everyone))
            raise InputError(f"the ranks of a parallel run must use one kind of device and one dtype; got {names}")

    def attach(self, transformer) -> None:
        """Give the transformer this rank's share of the tokens (with more than one Ulysses rank)."""
        self.check_heads(transformer.cfg.num_attention_heads)
        if self.config.ulysses > 1:
            from qimg.parallel.ulysses import UlyssesSequence

            transformer.set_sequence(UlyssesSequence(self.seq_group, self.seq_rank, self.config.ulysses))

    def check_heads(self, heads: int) -> None:
        if heads % self.config.ulysses:
            raise InputError(f"parallel ulysses={self.config.ulysses} must divide the transformer's {heads} "
                             f"attention heads")

    @property
    def branch(self) -> str:
        """The guidance branch this rank computes when the guidance groups split them."""
        return BRANCHES[self.cfg_rank]

    def describe(self) -> dict:
        return {"parallel": str(self.config), "rank": self.rank, "world": self.world}

    def combine_branches(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) from this rank's branch and its guidance peer's."""
        both = [torch.empty_like(mine) for _ in range(self.config.cfg)]
        dist.all_gather(both, mine.contiguous(), group=self.cfg_group)
        return both[0], both[1]

    def sum_over_branches(self, values: list[int]) -> list[int]:
        """`values` summed over the guidance groups (each counts the calls of its own branch)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.cfg_group)
        return [int(v) for v in t.tolist()]

    def run_tiles(self, fn: Callable[[torch.Tensor], torch.Tensor], tiles: list[torch.Tensor]
                  ) -> Iterator[torch.Tensor]:
        """`fn` of every tile, the tiles shared round-robin by every rank and gathered, in order. Tiles are equal in
        shape, so are their outputs; a rank whose share is short computes a copy of one (to keep the exchange one
        equal-sized gather)."""
        per = math.ceil(len(tiles) / self.world)
        mine = torch.stack([fn(tiles[i % len(tiles)]) for i in range(self.rank, per * self.world, self.world)])
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine.contiguous())
        for i in range(len(tiles)):
            yield everyone[i % self.world][i // self.world]


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DEVICE_NAMES = ("cpu", "cuda", "mps", "xpu")


def _code(options: tuple, value) -> int:
    """`value`'s place in `options` (one past them for anything else): what the ranks exchange."""
    return options.index(value) if value in options else len(options)


def _named(options: tuple, code: int) -> str:
    return str(options[code]).replace("torch.", "") if code < len(options) else "other"
