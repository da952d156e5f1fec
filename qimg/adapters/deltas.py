"""What an adapter adds to one Linear layer, as a weight delta `dW` (`[out, in]`) and an optional bias delta, each
already multiplied by the file's own scale (alpha / rank where the format has one); the user's scale is applied by
the slot that holds it.

- LowRank: LoRA, `dW = scale * up @ down` (`lora_B @ lora_A`, kohya's `lora_up @ lora_down`), applied unfused as
  two small matrix products; a `lora_B.bias` is scaled with it (PEFT's `lora_bias`).
- Dense: full-weight deltas (`.diff`, `.diff_b`).
- Kronecker: LyCORIS LoKr, `dW = scale * kron(w1, w2)`, each factor whole or a product of two.
- Hadamard: LyCORIS LoHa, `dW = scale * (w1_a @ w1_b) * (w2_a @ w2_b)`.
The dense forms are materialised once per device and dtype when they are applied unfused.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Delta(ABC):
    scale: float

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors this delta holds, by role (moved and cast together)."""

    @abstractmethod
    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "Delta":
        """The same delta on other tensors (after a move or cast)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer this delta fits."""

    @abstractmethod
    def weight(self) -> torch.Tensor:
        """`dW`, in float32."""

    def bias(self) -> torch.Tensor | None:
        return None

    def rank(self) -> int | None:
        return None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ dW^T (+ bias)` for the layer's input `x`."""
        out = F.linear(x, self._dense(x))
        bias = self.bias()
        return out if bias is None else out + bias.to(out.dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if getattr(self, "_cache", None) is None or self._cache[0] != key:
            self._cache = (key, self.weight().to(x.device, x.dtype))
        return self._cache[1]


@dataclass
class LowRank(Delta):
    down: torch.Tensor = None  # [r, in]
    up: torch.Tensor = None  # [out, r]
    up_bias: torch.Tensor | None = None  # [out]

    def tensors(self):
        return {k: v for k, v in (("down", self.down), ("up", self.up), ("up_bias", self.up_bias)) if v is not None}

    def with_tensors(self, tensors):
        return LowRank(self.scale, tensors["down"], tensors["up"], tensors.get("up_bias"))

    @property
    def shape(self):
        return self.up.shape[0], self.down.shape[1]

    def rank(self):
        return int(self.down.shape[0])

    def weight(self):
        return (self.up.float() @ self.down.float()) * self.scale

    def bias(self):
        return None if self.up_bias is None else self.up_bias.float() * self.scale

    def apply(self, x):
        out = F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype),
                       None if self.up_bias is None else self.up_bias.to(x.dtype))
        return out * self.scale


@dataclass
class Dense(Delta):
    diff: torch.Tensor | None = None  # [out, in]
    diff_b: torch.Tensor | None = None  # [out]
    features: tuple[int, int] | None = field(default=None)  # (out, in) when only a bias delta is given

    def tensors(self):
        return {k: v for k, v in (("diff", self.diff), ("diff_b", self.diff_b)) if v is not None}

    def with_tensors(self, tensors):
        return Dense(self.scale, tensors.get("diff"), tensors.get("diff_b"), self.features)

    @property
    def shape(self):
        return tuple(self.diff.shape) if self.diff is not None else self.features

    def weight(self):
        if self.diff is None:
            return torch.zeros(self.shape, dtype=torch.float32, device=self.diff_b.device)
        return self.diff.float() * self.scale

    def bias(self):
        return None if self.diff_b is None else self.diff_b.float() * self.scale

    def apply(self, x):
        out = torch.zeros(*x.shape[:-1], self.shape[0], dtype=x.dtype, device=x.device) if self.diff is None \
            else F.linear(x, self.diff.to(x.dtype)) * self.scale
        return out if self.diff_b is None else out + (self.diff_b.float() * self.scale).to(x.dtype)


def _factor(whole, a, b):
    return whole.float() if whole is not None else a.float() @ b.float()


@dataclass
class Kronecker(Delta):
    parts: dict = field(default_factory=dict)  # w1 | (w1_a, w1_b), w2 | (w2_a, w2_b)
    out_in: tuple[int, int] = (0, 0)

    def tensors(self):
        return dict(self.parts)

    def with_tensors(self, tensors):
        return Kronecker(self.scale, dict(tensors), self.out_in)

    @property
    def shape(self):
        return self.out_in

    def rank(self):
        for name in ("w1_b", "w2_b"):
            if name in self.parts:
                return int(self.parts[name].shape[0])
        return None

    def weight(self):
        p = self.parts
        w1 = _factor(p.get("w1"), p.get("w1_a"), p.get("w1_b"))
        w2 = _factor(p.get("w2"), p.get("w2_a"), p.get("w2_b"))
        return torch.kron(w1, w2).reshape(self.out_in) * self.scale


@dataclass
class Hadamard(Delta):
    parts: dict = field(default_factory=dict)  # w1_a, w1_b, w2_a, w2_b

    def tensors(self):
        return dict(self.parts)

    def with_tensors(self, tensors):
        return Hadamard(self.scale, dict(tensors))

    @property
    def shape(self):
        return self.parts["w1_a"].shape[0], self.parts["w1_b"].shape[1]

    def rank(self):
        return int(self.parts["w1_b"].shape[0])

    def weight(self):
        p = self.parts
        return (p["w1_a"].float() @ p["w1_b"].float()) * (p["w2_a"].float() @ p["w2_b"].float()) * self.scale


def moved(delta: Delta, device, dtype) -> Delta:
    """`delta` with its tensors on `device` in `dtype` (floating tensors only)."""
    return delta.with_tensors({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                               for k, v in delta.tensors().items()})
