"""`--compile`: regional compilation of a transformer's repeated block.

Each block has two per-token halves, `project` (modulated norm, q/k/v with their norms and RoPE) and `finish`
(output projection, gated residuals, the MLP); attention runs between them, uncompiled, through the backend and the
token layout (so sequence parallelism's exchanges and the 2.x prefix stay as they are). Both halves are compiled
once per block class and shared by every block (the block's weights are inputs of the graph, not constants), so a
model of 60 blocks compiles two graphs, not 120. Their shapes are symbolic (`dynamic=True`): a new step, guidance
branch (v1's text streams differ in length), prompt or resolution reuses them, or at most compiles a half once more
for a size that breaks one of the graph's assumptions. RoPE runs on a real (cos, sin) table in compiled code
(inductor generates no complex arithmetic). The time spent compiling is in `compile_seconds()`.
"""

from __future__ import annotations

import types

import torch

_COMPILED: dict = {}


def _shared(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def compile_blocks(transformer) -> None:
    """Compile `transformer`'s blocks' halves (in place; idempotent)."""
    for block in transformer.transformer_blocks:
        cls = type(block)
        block.project = types.MethodType(_shared(cls.project), block)
        block.finish = types.MethodType(_shared(cls.finish), block)
    transformer.compiled_blocks = True


def compile_seconds() -> float:
    """Seconds this process has spent compiling (all torch.compile work so far)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))
