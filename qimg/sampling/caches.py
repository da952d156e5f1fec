"""Step caches: skip most of the transformer when a step would change little (`cache="NAME[:THRESHOLD]"`).

First-block cache: every model call runs the first block; when the first block's residual (output minus input)
differs from the one of the last fully computed call of the same guidance branch by less than `threshold`
(mean absolute difference over mean absolute value), the other blocks are skipped and the residual they added at
that last full call is added instead. The first `warmup` calls of a branch and any call after `max_skips` skips in a
row are computed in full. It works through the per-block hook (`qimg.models.hooks`), so the 2.x prefix KV cache and
condition images are untouched: only the target tokens' pass through the blocks is skipped. Threshold 0 never skips.

Magnitude cache (after MagCache): a skipped call runs no block at all; the whole model's residual (output minus
input) of the last full call is reused. Whether to skip is decided before the call from the magnitude ratio of the
last two full calls' residuals (how fast the residual is still changing, estimated on the fly instead of from a
per-model calibration): each skip adds |1 - ratio| to an error estimate, and calls are skipped while it stays under
`threshold`; a full call resets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from qimg.errors import InputError

CACHES = {"fbcache": 0.2, "magcache": 0.12}  # name -> default threshold (measured in bench/step_cache.py)


@dataclass(frozen=True)
class CacheSpec:
    name: str
    threshold: float
    warmup: int = 2
    max_skips: int = 3

    def __str__(self) -> str:
        return f"{self.name}:{self.threshold:g}"


def parse_cache(text) -> CacheSpec | None:
    """"fbcache" or "fbcache:0.1" (None, "" or "none": no cache); InputError naming the problem otherwise."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(text, CacheSpec):
        return text
    if not isinstance(text, str):
        raise InputError(f"cache must be a string such as 'fbcache:0.08', got {text!r}")
    name, _, value = text.strip().lower().partition(":")
    if name not in CACHES:
        raise InputError(f"cache must be one of {sorted(CACHES)} (optionally NAME:THRESHOLD), got {text!r}")
    if not value:
        return CacheSpec(name, CACHES[name])
    try:
        threshold = float(value)
    except ValueError:
        raise InputError(f"cache threshold must be a number, got {value!r} in {text!r}") from None
    if not 0 <= threshold <= 1:
        raise InputError(f"cache threshold must be in [0, 1], got {threshold:g}")
    return CacheSpec(name, threshold)


def _first(state):
    return state[0] if isinstance(state, tuple) else state


def _apply(fn, a, b):
    return tuple(fn(x, y) for x, y in zip(a, b)) if isinstance(a, tuple) else fn(a, b)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def relative_change(new: torch.Tensor, old: torch.Tensor, total=_whole) -> float:
    """Mean absolute difference over mean absolute value; `total` sums the statistics over the processes that
    share the tokens (sequence parallelism), so that every rank takes the same decision."""
    sums = torch.stack([(new.float() - old.float()).abs().sum(), old.float().abs().sum(),
                        torch.tensor(float(new.numel()), device=new.device)])
    diff, size, count = total(sums).tolist()
    return (diff / count) / max(size / count, 1e-12)


@dataclass
class _Branch:
    """What a cache keeps for one guidance branch; each cache adds its own fields."""

    calls: int = 0
    run_of_skips: int = 0
    skipping: bool = False
    last_out: object = None  # the latest block output of a full call in progress (None once used)


@dataclass
class _StepCache:
    """One run's cache: `hook` is a block hook (`(BlockStep, index, state, run) -> state`) around `inner` (another
    block hook, or None); `skipped` counts the model calls it skipped, `calls` all of them."""

    spec: CacheSpec
    inner: object = None
    total: Callable = _whole  # sums a statistic over the ranks sharing the tokens (identity on one process)
    skipped: int = 0
    calls: int = 0
    branches: dict = field(default_factory=dict)
    branch_type = _Branch

    def _compute(self, where, index, state, run):
        return self.inner(where, index, state, run) if self.inner is not None else run(state)

    def _branch(self, where) -> _Branch:
        return self.branches.setdefault(where.branch, self.branch_type())

    def _may_skip(self, branch: _Branch) -> bool:
        """The rules both caches share: a threshold above 0, past the warm-up, under the cap of skips in a row."""
        spec = self.spec
        return spec.threshold > 0 and branch.calls >= spec.warmup and branch.run_of_skips < spec.max_skips

    def _count(self, branch: _Branch, skipping: bool) -> None:
        """Record the decision of a call (its first block)."""
        self.calls += 1
        branch.calls += 1
        branch.skipping = skipping
        if skipping:
            self.skipped += 1
            branch.run_of_skips += 1
        else:
            branch.run_of_skips = 0


@dataclass
class _FirstBlock(_Branch):
    first_residual: object = None  # the first block's residual at the last full call
    first_out: object = None  # the first block's output at the last full call
    rest_residual: object = None  # what blocks 1.. added at the last full call


@dataclass
class FirstBlockCache(_StepCache):
    branch_type = _FirstBlock

    def hook(self, where, index, state, run):
        branch = self._branch(where)
        if index > 0:
            if branch.skipping:
                return _apply(torch.add, state, branch.rest_residual) if index == 1 else state
            branch.last_out = self._compute(where, index, state, run)
            return branch.last_out
        if branch.last_out is not None:  # the previous call ran in full: what did its other blocks add?
            branch.rest_residual = _apply(torch.sub, branch.last_out, branch.first_out)
            branch.last_out = None
        out = self._compute(where, index, state, run)
        residual = _apply(torch.sub, out, state)
        self._count(branch, self.decide(branch, residual))
        if not branch.skipping:
            branch.first_residual, branch.first_out = residual, out
        return out

    def decide(self, branch: _FirstBlock, residual) -> bool:
        if not self._may_skip(branch) or branch.first_residual is None or branch.rest_residual is None:
            return False
        return relative_change(_first(residual), _first(branch.first_residual), self.total) < self.spec.threshold


@dataclass
class _Magnitudes(_Branch):
    residual: object = None  # the whole model's residual at the last full call
    norms: list = field(default_factory=list)  # its norm at the full calls so far
    error: float = 0.0
    input: object = None  # the input of the full call in progress


@dataclass
class MagnitudeCache(_StepCache):
    branch_type = _Magnitudes

    def hook(self, where, index, state, run):
        branch = self._branch(where)
        if index == 0:
            self.finish(branch)
            self._count(branch, self.decide(branch))
            if branch.skipping:
                return _apply(torch.add, state, branch.residual)
            branch.error, branch.input = 0.0, state
        if branch.skipping:
            return state
        branch.last_out = self._compute(where, index, state, run)
        return branch.last_out

    def finish(self, branch: _Magnitudes) -> None:
        """After a full call (seen at the next one): its residual and the residual's norm."""
        if branch.last_out is None or branch.input is None:
            return
        branch.residual = _apply(torch.sub, branch.last_out, branch.input)
        branch.norms.append(float(self.total(_first(branch.residual).float().pow(2).sum()).sqrt()))
        branch.last_out = branch.input = None

    def decide(self, branch: _Magnitudes) -> bool:
        if not self._may_skip(branch) or branch.residual is None or len(branch.norms) < 2 or branch.norms[-2] == 0:
            return False
        step = abs(1 - branch.norms[-1] / branch.norms[-2])
        if branch.error + step >= self.spec.threshold:
            return False
        branch.error += step
        return True


KINDS = {"fbcache": FirstBlockCache, "magcache": MagnitudeCache}
