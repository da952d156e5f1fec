"""The LoRAs a server may use: the `.safetensors` files under `--lora-dir`, named by their path relative to it
without the suffix ("style/ink" for `<dir>/style/ink.safetensors`). A request names them; a name that is not
there, or that would lead outside the directory (also through a link), is refused with the names that are."""

from __future__ import annotations

from pathlib import Path

from qimg.adapters.files import read_adapter
from qimg.errors import QimgError
from qimg.serve.errors import bad_request

SUFFIX = ".safetensors"
MAX_PER_REQUEST = 8


class LoraLibrary:
    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder).resolve()
        self._described: dict[tuple, dict] = {}

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.folder).with_suffix("")) for p in self.folder.rglob(f"*{SUFFIX}")
                      if self._inside(p))

    def _inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.folder)
        except ValueError:
            return False
        return path.is_file()

    def path(self, name: str) -> Path:
        """The file of `name`; HTTP 400 naming the available LoRAs otherwise."""
        available = self.names()
        if self.folder is None:
            raise bad_request("this server takes no LoRAs: start it with --lora-dir DIR", param="loras")
        candidate = self.folder / f"{name}{SUFFIX}"
        if not isinstance(name, str) or name not in available or not self._inside(candidate):
            raise bad_request(f"unknown LoRA {name!r}; available: {', '.join(available) or '(none)'}",
                              param="loras", code="lora_not_found")
        return candidate

    def specs(self, requested: list[dict] | None) -> list[dict]:
        """Checked [{"name", "scale"}] for a job's record (the files are found again by name when it runs)."""
        requested = requested or []
        if len(requested) > MAX_PER_REQUEST:
            raise bad_request(f"{len(requested)} LoRAs requested; the limit is {MAX_PER_REQUEST}", param="loras")
        out = []
        for item in requested:
            self.path(item["name"])
            out.append({"name": item["name"], "scale": float(item.get("scale", 1.0))})
        if len({i["name"] for i in out}) != len(out):
            raise bad_request("a LoRA is named twice in 'loras'", param="loras")
        return out

    def describe(self) -> list[dict]:
        """Every LoRA with its format, family, rank and size (read from the file headers, cached)."""
        out = []
        for name in self.names():
            path = self.folder / f"{name}{SUFFIX}"
            stat = path.stat()
            key = (name, stat.st_mtime_ns, stat.st_size)
            if key not in self._described:
                try:
                    summary = read_adapter(path, header_only=True).summary()
                except QimgError as err:
                    summary = {"error": str(err)}
                self._described[key] = {"id": name, "object": "lora", "bytes": stat.st_size, **summary}
            out.append(self._described[key])
        return out
