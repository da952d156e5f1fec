"""The adapters of one transformer: which files are attached, which are active at what scale, fused or not.

Files are checked against the model before anything changes: a file whose layers match nothing, match only in part
(unless partial loading is asked for), have the wrong shapes or are for another model family is refused with its
unmatched names and what it looks like. Switching the active set keeps the attached deltas (up to `keep_inactive`
unused ones), so a server that alternates between LoRAs never reloads the base model or re-reads a file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qimg.adapters.deltas import moved
from qimg.adapters.files import FAMILIES, AdapterFile, read_adapter
from qimg.adapters.slot import drop_slot, slot_of, sync_hook
from qimg.errors import InputError
from qimg.models.layers import layer_device, layer_dtype

LIST_CAP = 12


@dataclass(frozen=True)
class LoraSpec:
    """An adapter file and the scale it is used at; `name` (default: the file's stem) tells adapters apart."""

    path: str
    scale: float = 1.0
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or self.scale != self.scale:
            raise InputError(f"a LoRA scale must be a number, got {self.scale!r} for {self.path}")
        object.__setattr__(self, "path", str(self.path))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def key(self) -> str:
        return self.name or Path(self.path).stem

    @classmethod
    def of(cls, value) -> "LoraSpec":
        """From a LoraSpec, a (path, scale) pair, a {"path"/"name", "scale"} mapping or "FILE[:SCALE]"."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, (tuple, list)) and len(value) == 2:
            return cls(str(value[0]), value[1])
        if isinstance(value, dict):
            return cls(str(value.get("path") or value.get("name")), value.get("scale", 1.0), value.get("name"))
        if isinstance(value, (str, os.PathLike)):
            text = str(value)
            head, sep, tail = text.rpartition(":")
            if sep and head:
                try:
                    return cls(head, float(tail))
                except ValueError:
                    pass
            return cls(text)
        raise InputError(f"a LoRA is a path, 'FILE:SCALE' or (path, scale), got {value!r}")


@dataclass
class Attached:
    spec: LoraSpec
    file: AdapterFile
    modules: list[str]  # the layers it adapts in this model

    def report(self) -> dict:
        return {"name": self.spec.key, "path": self.spec.path, "scale": self.spec.scale, "format": self.file.format,
                "layers": len(self.modules), "of": len(self.file.deltas), "ranks": self.file.ranks(),
                "settings": self.file.settings}


class Adapters:
    def __init__(self, model: nn.Module, family: str, pipeline_class: str, keep_inactive: int = 4):
        self.model, self.family, self.pipeline_class = model, family, pipeline_class
        self.linears = {name: m for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) or getattr(m, "quantized_weights", False)}
        self.flat = {name.replace(".", "_"): name for name in self.linears}
        self.attached: dict[str, Attached] = {}  # by adapter name, active or kept
        self.active: list[str] = []
        self.fused = False
        self.keep_inactive = keep_inactive
        self._files: dict[tuple, AdapterFile] = {}

    # -- reading and checking ------------------------------------------------------------------------------------
    def read(self, spec: LoraSpec) -> AdapterFile:
        path = Path(spec.path)
        try:
            stat = path.stat()
        except OSError:
            raise InputError(f"LoRA file not found: {spec.path}") from None
        sidecar = path.with_suffix(".json")  # its sampling settings may sit beside it
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size,
               sidecar.stat().st_mtime_ns if sidecar.is_file() else None)
        if key not in self._files:
            self._files = {k: v for k, v in self._files.items() if k[0] != key[0]}
            self._files[key] = read_adapter(path, self.flat)
        return self._files[key]

    def check(self, spec: LoraSpec, file: AdapterFile, partial: bool) -> list[str]:
        """The layers `file` adapts in this model, or InputError saying why it does not fit."""
        what = f"{spec.path} ({file.describe()})"
        if file.looks_like or (file.family and file.family != self.family):
            raise InputError(f"{what} does not fit this model, {FAMILIES[self.family]} ({self.pipeline_class})")
        matched = [m for m in file.deltas if m in self.linears]
        unmatched = [m for m in file.deltas if m not in self.linears]
        wrong = [f"{m}: adapter {tuple(file.deltas[m].shape)}, layer "
                 f"{(self.linears[m].out_features, self.linears[m].in_features)}"
                 for m in matched if tuple(file.deltas[m].shape) != (self.linears[m].out_features,
                                                                        self.linears[m].in_features)]
        if wrong:
            raise InputError(f"{what}: {len(wrong)} layers have other shapes than this model's: {_cap(wrong)}")
        if not matched:
            raise InputError(f"{what}: none of its {len(unmatched)} layers is in this model ({self.pipeline_class}); "
                             f"unmatched: {_cap(unmatched)}")
        if unmatched and not partial:
            raise InputError(f"{what}: {len(unmatched)} of its {len(file.deltas)} layers are not in this model "
                             f"({_cap(unmatched)}); load the {len(matched)} that are with --lora-partial "
                             f"(lora_partial=True)")
        return matched

    # -- the active set ----------------------------------------------------------------------------------------
    def set(self, specs, *, fused: bool, partial: bool = False) -> list[dict]:
        """Make `specs` the active adapters (replacing the previous set), fused into the weights or beside them;
        `specs` is a list (of paths, "FILE:SCALE", (path, scale) pairs or LoraSpecs) or a {path: scale} mapping."""
        if isinstance(specs, dict):
            specs = list(specs.items())
        specs = [LoraSpec.of(s) for s in specs]
        names = [s.key for s in specs]
        if len(set(names)) != len(names):
            raise InputError(f"two LoRAs share a name in {names}; name them apart")
        ready = []
        for spec in specs:  # read and check everything before changing anything
            file = self.read(spec)
            ready.append((spec, file, self.check(spec, file, partial)))
        quantized = sorted({m for _, _, modules in ready for m in modules
                            if getattr(self.linears[m], "quantized_weights", False)})
        if fused and quantized:
            raise InputError(f"LoRAs cannot be merged into quantized weights ({len(quantized)} layers, e.g. "
                             f"{quantized[0]}: {self.linears[quantized[0]].extra_repr()}); apply them unfused "
                             f"(--lora-mode unfused, lora_mode='unfused')")
        self._unfuse_all()
        for spec, file, modules in ready:
            current = self.attached.get(spec.key)
            if current is None or current.file is not file or current.modules != modules:
                self._detach(spec.key)
                self._attach(spec.key, file, modules)
            self.attached[spec.key] = Attached(spec, file, modules)
        self.active = names
        self._evict()
        for linear in self._slotted():
            slot = linear.adapters
            slot.scales = {n: self.attached[n].spec.scale for n in names if n in slot.kinds}
            if fused:
                slot.fuse(linear)
            sync_hook(linear)
        self.fused = fused and bool(names)
        return [self.attached[n].report() for n in names]

    def clear(self) -> None:
        """Remove every adapter: the layers are exactly as loaded."""
        for linear in self._slotted():
            drop_slot(linear)
        self.attached, self.active, self.fused = {}, [], False

    def describe(self) -> list[dict]:
        return [{**self.attached[n].report(), "fused": self.fused} for n in self.active]

    def settings(self) -> list[tuple[str, dict]]:
        """The sampling settings the active files carry, (name, settings) in order."""
        return [(n, self.attached[n].file.settings) for n in self.active if self.attached[n].file.settings]

    # -- internals -----------------------------------------------------------------------------------------------
    def _slotted(self):
        return [m for m in self.linears.values() if getattr(m, "adapters", None) is not None]

    def _attach(self, name: str, file: AdapterFile, modules: list[str]) -> None:
        for module in modules:
            linear = self.linears[module]
            slot_of(linear).add(name, moved(file.deltas[module], layer_device(linear), layer_dtype(linear)))

    def _detach(self, name: str) -> None:
        self.attached.pop(name, None)
        for linear in self._slotted():
            linear.adapters.remove(name)
            if not linear.adapters.kinds:
                drop_slot(linear)

    def _unfuse_all(self) -> None:
        for linear in self._slotted():
            linear.adapters.unfuse(linear)
        self.fused = False

    def _evict(self) -> None:
        inactive = [n for n in self.attached if n not in self.active]
        for name in inactive[: max(0, len(inactive) - self.keep_inactive)]:
            self._detach(name)


def _cap(items: list[str]) -> str:
    shown = ", ".join(items[:LIST_CAP])
    return shown + (f", ... ({len(items) - LIST_CAP} more)" if len(items) > LIST_CAP else "")
