"""Memory-mapped safetensors loading into modules built on the meta device.

Tensors returned by `open_state_dict` are zero-copy views on a private (copy-on-write) mmap of each file:
opening costs no RAM, pages are read from disk when first touched, and writing to a tensor copies only
the touched pages, never the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable

import torch

from qimg.errors import CheckpointError
from qimg.loading.files import read_json

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
BASE_NAMES = ("diffusion_pytorch_model", "model")
MAX_HEADER = 100 * 1024 * 1024
_LIST_CAP = 20
_PAGE = mmap.PAGESIZE


class _Mapped:
    """One mapped safetensors file: tensor views plus each tensor's byte range in the mapping."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranges: dict[str, tuple[int, int]] = {}
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise CheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise CheckpointError(f"weight file not found: {path}") from None
        except OSError as e:
            raise CheckpointError(f"cannot open weight file {path}: {e}") from None
        (n,) = struct.unpack("<Q", self.mm[:8])
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(
                f"{path}: corrupt safetensors header: header length {n} exceeds the file "
                f"({size} bytes) or the {MAX_HEADER}-byte limit"
            )
        try:
            header = json.loads(bytes(self.mm[8 : 8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: invalid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header: expected a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        for key, info in header.items():
            start, end, dtype, shape = self._check_entry(key, info, size - base)
            self.ranges[key] = (base + start, base + end)
            if end == start:
                self.tensors[key] = torch.empty(shape, dtype=dtype)
            else:
                flat = torch.frombuffer(self.mm, dtype=dtype, count=math.prod(shape), offset=base + start)
                self.tensors[key] = flat.view(shape)

    def _check_entry(self, key, info, data_size):
        bad = f"{self.path}: corrupt safetensors header for tensor {key!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad}: entry is {info!r}")
        name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if name not in DTYPES:
            raise CheckpointError(f"{bad}: unknown dtype {name!r} (supported: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{bad}: invalid shape {shape!r}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{bad}: invalid data_offsets {offsets!r}")
        dtype = DTYPES[name]
        start, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - start != expected:
            raise CheckpointError(
                f"{bad}: data_offsets {offsets} span {end - start} bytes but shape {shape} "
                f"of {name} needs {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{self.path}: file is truncated: tensor {key!r} ends at data byte {end} "
                f"but the file has only {data_size} data bytes"
            )
        return start, end, dtype, shape

    def release(self, key: str) -> None:
        """Drop the pages of `key` from this process (they are re-read from disk if touched again)."""
        a, b = self.ranges[key]
        a = -(-a // _PAGE) * _PAGE
        b = b // _PAGE * _PAGE
        if b > a and hasattr(self.mm, "madvise"):
            self.mm.madvise(mmap.MADV_DONTNEED, a, b - a)


class _Renamed:
    """A mapping's `release(key)` under another key name (for a prefixed part of a checkpoint)."""

    def __init__(self, mapped: _Mapped, key: str):
        self.mapped, self.key = mapped, key

    def release(self, key: str) -> None:
        self.mapped.release(self.key)


def _locate(folder: Path, base_name: str | None) -> list[Path]:
    """The safetensors file(s) of a component folder (or a single .safetensors file path)."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise CheckpointError(f"weight folder not found: {folder}")
    names = [base_name] if base_name else []
    names += [b for b in BASE_NAMES if b != base_name]
    for name in names:
        single, index = folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: missing or empty 'weight_map'")
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names missing shard file(s): {', '.join(missing)} (in {folder})")
            return [folder / s for s in shards]
    tried = ", ".join(f"{n}.safetensors[.index.json]" for n in names)
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise CheckpointError(f"no weights in {folder}: looked for {tried}; found {found}")


def _open(folder: Path, base_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, _Mapped]]:
    sd: dict[str, torch.Tensor] = {}
    owner: dict[str, _Mapped] = {}
    for path in _locate(folder, base_name):
        mapped = _Mapped(path)
        for key, t in mapped.tensors.items():
            if key in sd:
                raise CheckpointError(f"tensor {key!r} appears in both {owner[key].path.name} and {path.name}")
            sd[key], owner[key] = t, mapped
    return sd, owner


def open_state_dict(folder: str | os.PathLike,
                    base_name: str | None = "diffusion_pytorch_model") -> dict[str, torch.Tensor]:
    """Map the safetensors weights of a component folder: `{base}.safetensors` or a sharded
    `{base}.safetensors.index.json`; base names `diffusion_pytorch_model` and `model` are auto-detected.

    The tensors are zero-copy views on private copy-on-write mmaps (nothing is read until touched).
    """
    return _open(Path(folder), base_name)[0]


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_CAP])
    return shown + (f", ... ({len(keys) - _LIST_CAP} more)" if len(keys) > _LIST_CAP else "")


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], where: str = "") -> None:
    """CheckpointError for missing/unexpected keys (one message listing both) or shape mismatches."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    where = f" in {where}" if where else ""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
        raise CheckpointError(f"checkpoint{where} does not fit the model: " + "; ".join(parts))
    bad = [
        f"{k}: expected {tuple(t.shape)}, found {tuple(found[k].shape)}"
        for k, t in expected.items()
        if tuple(t.shape) != tuple(found[k].shape)
    ]
    if bad:
        more = f"; ... ({len(bad) - _LIST_CAP} more)" if len(bad) > _LIST_CAP else ""
        raise CheckpointError(f"shape mismatch{where} ({len(bad)} tensor(s)): " + "; ".join(bad[:_LIST_CAP]) + more)


def load_module(
    factory: Callable[[], torch.nn.Module],
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    base_name: str | None = "diffusion_pytorch_model",
    prefix: str | None = None,
) -> torch.nn.Module:
    """Build `factory()` on the meta device and assign the checkpoint's tensors to it (eval, no grad).

    - Keys and shapes must match exactly (CheckpointError otherwise); with `prefix`, only the checkpoint's keys
      under it are read (a part of a larger model), without it.
    - With `dtype`, floating-point tensors are cast one at a time; the source pages of each cast tensor are
      dropped from memory right away, so the peak is the converted model plus one tensor.
    - On CPU without a cast, parameters stay zero-copy views on the file mapping.
    - Non-persistent buffers (`register_buffer(..., persistent=False)`) are not in checkpoints and stay on
      meta after building. Convention: a module owning such buffers defines `init_non_persistent_buffers()`,
      which re-registers them; it is called on every submodule after loading, under `torch.device(device)`.
      Any tensor still on meta afterwards is an error.
    """
    device = torch.device(device)
    with torch.device("meta"):
        module = factory()
    sd, owner = _open(Path(folder), base_name)
    if prefix is not None:  # a part of a larger checkpoint: only its keys, without the prefix
        owner = {k[len(prefix):]: m for k, m in owner.items() if k.startswith(prefix)}
        sd = {k[len(prefix):]: t for k, t in sd.items() if k.startswith(prefix)}
        owner = {k: _Renamed(m, prefix + k) for k, m in owner.items()}
    check_state_dict(module.state_dict(), sd, str(folder))
    for key, t in sd.items():
        new = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        if new is not t:
            sd[key] = new
            owner[key].release(key)
    module.load_state_dict(sd, strict=True, assign=True)
    del sd, owner
    with torch.device(device):
        module.apply(lambda m: getattr(m, "init_non_persistent_buffers", lambda: None)())
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(
            f"{type(module).__name__}: tensors still on the meta device after loading: {_fmt_keys(left)}; "
            f"non-persistent buffers must be re-created in an init_non_persistent_buffers() method"
        )
    return module.eval().requires_grad_(False)


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temporary file beside `path`, then rename)."""
    from safetensors.torch import save_file

    from qimg.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: _own(v.detach()) for k, v in sd.items()}, str(tmp), metadata=metadata)


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous and alone in its storage (safetensors refuses tensors that share memory, such as the views
    that fused projections leave in a state dict)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
