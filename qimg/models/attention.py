"""Attention backends: the one function every transformer block calls to mix its queries, keys and values.

A backend is `attend(q, k, v, mask=None) -> out` on `[B, S, H, D]` tensors (`k`, `v` may be longer than `q`);
`mask` is boolean, True where a query may attend, broadcastable to `[B, H, S_q, S_k]`. A transformer holds its
backend (`set_attention`), so two models in one process may use different ones; faster kernels and sequence
parallelism plug in here without touching the model code.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from qimg.errors import InputError

Attend = Callable[..., torch.Tensor]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention (flash / memory-efficient / math kernels, chosen by torch)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Explicit softmax(q k^T / sqrt(d)) v with float32 scores: slow, memory-hungry and easy to read; a check on
    the fused kernels."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.float()).to(v.dtype)
    return out.transpose(1, 2)


BACKENDS: dict[str, Attend] = {"sdpa": sdpa, "math": math_attention}


def attention_backend(choice: str | Attend) -> Attend:
    """A backend by name (see BACKENDS), or a callable used as it is."""
    if callable(choice):
        return choice
    if choice not in BACKENDS:
        raise InputError(f"attention backend must be one of {sorted(BACKENDS)}, got {choice!r}")
    return BACKENDS[choice]


class UsesAttention:
    """Mixed into a transformer: the backend its blocks call (`self.attend`), sdpa until `set_attention`."""

    attend: Attend = staticmethod(sdpa)

    def set_attention(self, choice: str | Attend) -> None:
        self.attend = attention_backend(choice)
