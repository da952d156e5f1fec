"""`--compile`: torch.compile of a transformer, in one of two modes.

"blocks" (regional): each block has two per-token halves, `project` (modulated norm, q/k/v with their norms and
RoPE) and `finish` (output projection, gated residuals, the MLP); attention runs between them, uncompiled, through
the backend and the token layout (so sequence parallelism's exchanges and the 2.x prefix stay as they are). Both
halves are compiled once per block class and shared by every block (the block's weights are inputs of the graph, not
constants), so a model of 60 blocks compiles two graphs, not 120, in seconds at any size.

"step": the transformer's whole step (`STEP_METHODS`: 2.x's `denoise_step` with the cached prefix, v1's `forward`) as
one graph: no Python and no dispatch between the layers, which is what a small model on a CPU spends most of its
step on. It compiles every layer (longer at the official sizes), runs on one process only, and a step with a block
hook (a step cache, cancelling between blocks) runs eagerly: cancels land between steps.

Shapes are symbolic (`dynamic=True`): a new step, guidance branch, prompt or resolution reuses the graphs, or at most
compiles once more for a size that breaks one of a graph's assumptions. RoPE runs on a real (cos, sin) table in
compiled code (inductor generates no complex arithmetic). The time spent compiling is in `compile_seconds()`.
"""

from __future__ import annotations

import inspect
import types

import torch

from qimg.errors import InputError

MODES = ("blocks", "step")
STEP_METHODS = {"QwenImage21Transformer": "denoise_step", "QwenImageTransformer": "forward"}
_COMPILED: dict = {}


def compile_mode(value) -> str | bool:
    """A load option's `compile` as False, "blocks" or "step" (True means "blocks")."""
    if value is True:
        return "blocks"
    if value is False or value is None:
        return False
    if value in MODES:
        return value
    raise InputError(f"compile must be true, false or one of {list(MODES)}, got {value!r}")


def _shared(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def compile_transformer(transformer, mode: str = "blocks") -> None:
    """Compile `transformer` in place in `mode` ("blocks" or "step"; idempotent)."""
    if mode == "step":
        compile_step(transformer)
    else:
        compile_blocks(transformer)


def compile_blocks(transformer) -> None:
    """Compile `transformer`'s blocks' halves (in place; idempotent)."""
    for block in transformer.transformer_blocks:
        cls = type(block)
        block.project = types.MethodType(_shared(cls.project), block)
        block.finish = types.MethodType(_shared(cls.finish), block)
    transformer.compiled_blocks = True


def compile_step(transformer) -> None:
    """Compile `transformer`'s whole step (in place; idempotent). Steps with a block hook run eagerly."""
    name = STEP_METHODS.get(type(transformer).__name__)
    if name is None:
        raise InputError(f"compile 'step' does not know {type(transformer).__name__}; use 'blocks'")
    from qimg.models.attention import WHOLE

    if transformer.sequence is not WHOLE:
        raise InputError("compile 'step' runs on one process; a parallel run compiles 'blocks'")
    if transformer.compiled_step:
        return
    eager = getattr(type(transformer), name)
    compiled = torch.compile(eager, dynamic=True)
    hook_at = list(inspect.signature(eager).parameters).index("block_hook") - 1  # its place after self

    def step(self, *args, **kwargs):
        hook = args[hook_at] if len(args) > hook_at else kwargs.get("block_hook")
        if hook is not None:
            return eager(self, *args, **kwargs)
        args, kwargs = _real_tables(args), {k: _real_tables(v) for k, v in kwargs.items()}
        return compiled(self, *args, **kwargs)

    setattr(transformer, name, types.MethodType(step, transformer))
    transformer.compiled_blocks = transformer.compiled_step = True


def _real_tables(value):
    """Complex RoPE tables passed in (v1's `freqs`) as their (cos, sin) views: a graph takes no complex inputs."""
    if isinstance(value, torch.Tensor) and value.is_complex():
        return torch.view_as_real(value)
    if isinstance(value, tuple):
        return tuple(_real_tables(v) for v in value)
    return value


def compile_seconds() -> float:
    """Seconds this process has spent compiling (all torch.compile work so far)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))
