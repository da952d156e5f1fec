"""The per-block hook: how step caches (and anything else that must see inside a denoising step) reach the blocks.

Every transformer runs its blocks through `run_blocks`. Without a hook that is the plain loop. A hook is called
once per block as `hook(index, state, run) -> state`: `run(state)` computes the block and returns its output;
the hook may call it, change what goes in or comes out, or skip it and return something else (a cached
residual). `state` is what flows between the family's blocks: the image tokens for 2.x, `(image, text)` for v1.
The pipeline binds which step and which guidance branch a call belongs to (see `BlockStep`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

BlockHook = Callable[[int, Any, Callable[[Any], Any]], Any]


@dataclass(frozen=True)
class BlockStep:
    """Which transformer evaluation a block call belongs to: the `step`-th evaluation (0-based) of a `branch`
    ("cond" or "uncond") at `sigma`."""

    step: int
    branch: str
    sigma: torch.Tensor


def run_blocks(blocks, state, run_block: Callable[[int, Any, Any], Any], hook: BlockHook | None = None):
    """`state` through every block in order; `run_block(index, block, state) -> state` computes one."""
    for index, block in enumerate(blocks):
        if hook is None:
            state = run_block(index, block, state)
        else:
            state = hook(index, state, lambda s, i=index, b=block: run_block(i, b, s))
    return state
