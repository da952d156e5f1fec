"""Small things every pipeline shares: progress events, per-checkpoint defaults, device/dtype choice, seeds."""

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
    skipped: int = 0  # model calls a step cache has skipped so far (their blocks after the first)

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
    edit_cfg: float | None = None  # for requests with condition images; None: `cfg`
    edit_steps: int | None = None  # likewise; None: `steps`

    @classmethod
    def read(cls, index: dict, base: "Defaults") -> "Defaults":
        extra = index.get("_qimg") or {}
        edit_cfg = extra.get("default_edit_cfg", base.edit_cfg)
        edit_steps = extra.get("default_edit_steps", base.edit_steps)
        return cls(resolution=int(extra.get("default_resolution", base.resolution)),
                   steps=int(extra.get("default_steps", base.steps)), cfg=float(extra.get("default_cfg", base.cfg)),
                   edit_cfg=None if edit_cfg is None else float(edit_cfg),
                   edit_steps=None if edit_steps is None else int(edit_steps))

    def cfg_for(self, editing: bool) -> float:
        return self.edit_cfg if editing and self.edit_cfg is not None else self.cfg

    def steps_for(self, editing: bool) -> int:
        return self.edit_steps if editing and self.edit_steps is not None else self.steps


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


def pick_seed(seed: int | None) -> int:
    """The seed a run uses: the caller's, or a fresh random one (recorded with the picture either way)."""
    return secrets.randbelow(2**31) if seed is None else seed


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Starting noise, drawn as the reference draws it (on the CPU, in the model's dtype), so a seed gives the
    reference's picture in every dtype. torch draws half and bfloat16 normals by another path than float32 ones,
    whose values depend on the tensor's size and the torch version, so one seed can start from other noise in
    bfloat16 than in float32 (torch 2.11, 64x64 latents: it does; torch 2.13: it does not)."""
    return torch.randn(shape, generator=generator, dtype=dtype)


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
