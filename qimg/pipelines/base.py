"""What every pipeline shares: components, defaults, seeds, progress events."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from qimg.errors import InputError


@dataclass
class ProgressEvent:
    """One progress report: `stage` is "encode", "denoise" or "decode"; `step` of `total` within the stage."""

    stage: str
    step: int
    total: int
    elapsed: float
    latents: torch.Tensor | None = None
    preview: Callable[[], object] | None = field(default=None, repr=False)  # -> PIL image of the current estimate

    @property
    def eta(self) -> float | None:
        if self.stage != "denoise" or self.step == 0:
            return None
        return self.elapsed / self.step * (self.total - self.step)


Progress = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Defaults:
    """Per-checkpoint defaults; a checkpoint may override them in model_index.json under `_qimg`."""

    resolution: int
    steps: int
    cfg: float = 1.0

    @classmethod
    def read(cls, index: dict, base: "Defaults") -> "Defaults":
        extra = index.get("_qimg") or {}
        return cls(resolution=int(extra.get("default_resolution", base.resolution)),
                   steps=int(extra.get("default_steps", base.steps)), cfg=float(extra.get("default_cfg", base.cfg)))


def pick_device(device) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' was asked for but torch sees no MPS device")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA, float16 on MPS, unless asked."""
    if dtype is None:
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator (noise is drawn on the CPU, as the reference does, so seeds agree across devices)."""
    if seed is None:
        seed = secrets.randbelow(2**31)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return torch.Generator("cpu").manual_seed(seed), seed


def check_steps(steps) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
        raise InputError(f"steps must be an integer from 1 to 1000, got {steps!r}")
    return steps


class Clock:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class ModelInfo:
    folder: Path
    pipeline_class: str
    dtype: torch.dtype
    device: torch.device
