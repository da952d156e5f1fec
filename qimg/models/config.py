"""Model configs: frozen dataclasses read from a checkpoint's `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from qimg.errors import CheckpointError

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> T:
    """Build dataclass `cls` from a config dict: `_`-prefixed keys are metadata, unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if not k.startswith("_") and k not in fields and k not in ignore)
    if unknown:
        raise CheckpointError(f"{cls.__name__}: unknown config keys {unknown}; known keys are {sorted(fields)}")
    values = {}
    for key, value in data.items():
        if key in fields:
            values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{cls.__name__}: invalid config: {err}") from err
