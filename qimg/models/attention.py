"""Attention backends: the one function every transformer block calls to mix its queries, keys and values.

A backend is `attend(q, k, v, mask=None) -> out` on `[B, S, H, D]` tensors (`k`, `v` may be longer than `q`);
`mask` is boolean, True where a query may attend, broadcastable to `[B, H, S_q, S_k]`. A transformer holds its
backend (`set_attention`), so two models in one process may use different ones; faster kernels plug in here without
touching the model code.

A transformer also holds how its image tokens are laid out across processes (`set_sequence`): `WholeSequence` (one
process, the default) or a sequence-parallel layout (`qimg.parallel.ulysses`) with the same four methods. The
models shard their image tokens on the way into the blocks, gather them on the way out, and run every attention
through `sequence.attention`, whose `context` tokens (text, the 2.x prefix) are whole on every process.
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


def kernel_applies(q: torch.Tensor, mask) -> bool:
    """Whether a GPU attention kernel (FlashAttention, SageAttention) can take this call: CUDA, half precision, no
    mask (they take none; masked calls, e.g. padded prompts, go through sdpa)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and mask is None


def flash_attention(q, k, v, mask=None):
    """FlashAttention 2 (`flash_attn.flash_attn_func`, `[B, S, H, D]` as qimg's) where it applies, else sdpa."""
    if not kernel_applies(q, mask):
        return sdpa(q, k, v, mask)
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)


def sage_attention(q, k, v, mask=None):
    """SageAttention (`sageattention.sageattn`, 8-bit q/k) where it applies, else sdpa."""
    if not kernel_applies(q, mask):
        return sdpa(q, k, v, mask)
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


BACKENDS: dict[str, Attend] = {"sdpa": sdpa, "math": math_attention, "flash": flash_attention,
                               "sage": sage_attention}
PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention")}


def attention_backend(choice: str | Attend) -> Attend:
    """A backend by name (see BACKENDS), or a callable used as it is; a GPU kernel's backend needs its package."""
    if callable(choice):
        return choice
    if choice not in BACKENDS:
        raise InputError(f"attention backend must be one of {sorted(BACKENDS)}, got {choice!r}")
    if choice in PACKAGES:
        import importlib.util

        module, package = PACKAGES[choice]
        if importlib.util.find_spec(module) is None:
            raise InputError(f"attention backend {choice!r} needs the {package} package on a CUDA GPU "
                             f"(pip install {package}); the default sdpa needs nothing")
    return BACKENDS[choice]


class WholeSequence:
    """Every image token on this process: sharding and gathering do nothing, attention is one call."""

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's part of a tensor along its token axis `dim`."""
        return t

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole tensor from every process's part along `dim`."""
        return t

    def span(self, length: int) -> tuple[int, int]:
        """Which of `length` tokens (start, stop) are this process's."""
        return 0, length

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the processes that share the sequence (for statistics over all tokens)."""
        return t

    def attention(self, attend: Attend, q, k, v, mask=None, context=None):
        """Attention of this process's tokens (`[B, S, H, D]`) and of `context` = (q or None, k, v), tokens whole
        on every process that come first in the sequence; -> (context output or None, output)."""
        if context is None:
            return None, attend(q, k, v, mask)
        cq, ck, cv = context
        k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        if cq is None:
            return None, attend(q, k, v, mask)
        out = attend(torch.cat([cq, q], 1), k, v, mask)
        return out[:, :cq.shape[1]], out[:, cq.shape[1]:]


WHOLE = WholeSequence()


class UsesAttention:
    """Mixed into a transformer: the backend its blocks call (`self.attend`), sdpa until `set_attention`, and the
    layout of its tokens across processes (`self.sequence`), whole until `set_sequence`."""

    attend: Attend = staticmethod(sdpa)
    sequence = WHOLE
    compiled_blocks = False  # set by qimg.models.compiled: blocks take real RoPE tables
    compiled_step = False  # set by qimg.models.compiled.compile_step: the whole step is one graph

    def set_attention(self, choice: str | Attend) -> None:
        self.attend = attention_backend(choice)

    def set_sequence(self, sequence) -> None:
        self.sequence = sequence if sequence is not None else WHOLE
