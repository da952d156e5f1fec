"""Flow-matching sigma schedules from a checkpoint's `scheduler_config.json` (pure functions, float32 like the
reference so that the same config gives the same sigmas to the last bit)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from qimg.errors import CheckpointError, InputError
from qimg.models.config import config_from_dict

_IGNORED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling", "invert_sigmas")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False
    invert_sigmas: bool = False

    def __post_init__(self):
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        unsupported = [k for k in _IGNORED if getattr(self, k)]
        if unsupported:
            raise ValueError(f"scheduler options not supported by qimg: {unsupported}")

    @classmethod
    def from_dict(cls, data: dict) -> "SchedulerConfig":
        return config_from_dict(cls, data)

    def with_overrides(self, overrides: dict | None) -> "SchedulerConfig":
        """This config with some keys replaced (a user's `--scheduler-config`, a preset's); a bad key or value is
        an InputError naming it."""
        if not overrides:
            return self
        known = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = sorted(set(overrides) - known, key=str)
        if unknown:
            raise InputError(f"scheduler config: unknown key(s) {', '.join(map(str, unknown))} (it takes: "
                             f"{', '.join(sorted(known))})")
        for key, value in overrides.items():
            _check_override(key, value)
        try:
            return config_from_dict(SchedulerConfig, {**dataclasses.asdict(self), **overrides})
        except CheckpointError as err:
            raise InputError(f"scheduler config: {err}") from None

    def with_shift(self, shift: float | None) -> "SchedulerConfig":
        """A constant shift `shift` at every resolution instead of the config's (dynamic or fixed) one; the rest of
        the config (its terminal stretch among it) is kept."""
        if shift is None:
            return self
        return dataclasses.replace(self, shift=float(shift), use_dynamic_shifting=False)


_KINDS = {"num_train_timesteps": "count", "base_image_seq_len": "count", "max_image_seq_len": "count",
          "shift": "positive", "base_shift": "number", "max_shift": "number", "shift_terminal": "fraction",
          "time_shift_type": "text"}


def _check_override(key: str, value) -> None:
    """A scheduler override's value has its field's type (and a sane range): InputError naming the key."""
    kind = _KINDS.get(key, "flag")
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = {"count": isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10**7,
          "positive": number and 0 < value <= 1000, "number": number and abs(value) <= 1000,
          "fraction": value is None or (number and 0 < value < 1), "text": isinstance(value, str),
          "flag": isinstance(value, bool)}[kind]
    if not ok:
        wanted = {"count": "an integer from 1 to 10000000", "positive": "a number in (0, 1000]",
                  "number": "a finite number", "fraction": "null or a number in (0, 1)", "text": "a string",
                  "flag": "true or false"}[kind]
        raise InputError(f"scheduler config: {key} must be {wanted}, got {value!r}")


def mu_for_tokens(cfg: SchedulerConfig, image_tokens: int) -> float:
    """The resolution-dependent shift: linear in the target token count between the config's two anchor points."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return image_tokens * m + (cfg.base_shift - m * cfg.base_image_seq_len)


def time_shift(cfg: SchedulerConfig, mu: float, sigmas: np.ndarray) -> np.ndarray:
    if cfg.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return mu / (mu + (1 / sigmas - 1))


def get_sigmas(cfg: SchedulerConfig, *, steps: int | None = None, mu: float | None = None,
               sigmas=None) -> np.ndarray:
    """Shifted sigmas for each step plus the terminal 0, float32 `[steps + 1]`.

    `sigmas` (the un-shifted grid, without the terminal 0) defaults to `linspace(1, 1/steps, steps)`; dynamic
    shifting needs `mu` (see `mu_for_tokens`).
    """
    if sigmas is None:
        if not steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        sigmas = np.linspace(1.0, 1 / steps, steps)
    sigmas = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
    if sigmas.ndim != 1 or len(sigmas) == 0:
        raise ValueError(f"sigmas must be a non-empty list of numbers, got shape {sigmas.shape}")
    if not np.all((sigmas > 0) & (sigmas <= 1)):
        raise ValueError(f"sigmas must lie in (0, 1], got {sigmas.tolist()}")
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this scheduler uses dynamic shifting: mu is required")
        sigmas = time_shift(cfg, mu, sigmas)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal and sigmas[-1] < 1:  # a lone sigma of 1 cannot be stretched (the reference gives NaN)
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return np.append(sigmas.astype(np.float32), np.float32(0.0))
