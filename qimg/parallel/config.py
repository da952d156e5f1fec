"""`--parallel ulysses=U,cfg=C`: how many ranks share a picture, and how."""

from __future__ import annotations

from dataclasses import dataclass

from qimg.errors import InputError

KINDS = ("ulysses", "cfg")


@dataclass(frozen=True)
class ParallelConfig:
    """`ulysses` ranks share each transformer call's image tokens; `cfg` (1 or 2) groups of them run the guidance
    branches side by side. The run needs `ulysses * cfg` processes."""

    ulysses: int = 1
    cfg: int = 1

    def __post_init__(self):
        for name in KINDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"parallel {name} must be a positive integer, got {value!r}")
        if self.cfg > 2:
            raise InputError(f"parallel cfg must be 1 or 2 (there are two guidance branches), got {self.cfg}")

    @property
    def world(self) -> int:
        return self.ulysses * self.cfg

    def __str__(self) -> str:
        return f"ulysses={self.ulysses},cfg={self.cfg}"

    @classmethod
    def parse(cls, text) -> "ParallelConfig | None":
        """"ulysses=2,cfg=2", "cfg=2", "ulysses=4" (None, "" or "none": one process)."""
        if text is None or isinstance(text, ParallelConfig):
            return text
        if not isinstance(text, str):
            raise InputError(f"parallel must be a string such as 'ulysses=2,cfg=2', got {text!r}")
        if text.strip().lower() in ("", "none", "off"):
            return None
        values = {}
        for part in text.replace(" ", "").lower().split(","):
            name, sep, value = part.partition("=")
            if name not in KINDS or not sep:
                raise InputError(f"parallel must be NAME=N[,NAME=N] with NAME in {list(KINDS)}, got {text!r}")
            if name in values:
                raise InputError(f"parallel names {name} twice in {text!r}")
            try:
                values[name] = int(value)
            except ValueError:
                raise InputError(f"parallel {name} must be an integer, got {value!r} in {text!r}") from None
        return cls(**values)

    @classmethod
    def for_processes(cls, n: int) -> "ParallelConfig":
        """The default split of `n` processes (`--gpus N` without `--parallel`): all of them share the tokens
        (Ulysses), which speeds up guided and unguided runs alike."""
        return cls(ulysses=n)
