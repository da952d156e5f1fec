"""The models a server serves, by name: checkpoints are loaded with `qimg.load` once and kept.

A model's tasks come from its pipeline's `describe()["tasks"]` once loaded ("generate", "edit", "layers").
Loading happens on the worker thread only (never in a request handler).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field

from qimg.options import LoadOptions

from qimg.serve.errors import ApiError, bad_request


@dataclass
class ModelEntry:
    name: str
    source: str | None  # what `qimg.load` gets: a folder, a cached repo id, or None (the embedded tiny model)
    pipeline: object | None = None
    state: str = "not loaded"  # "not loaded", "loading", "loaded", "error"
    error: str | None = None
    loaded_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tasks(self) -> list[str] | None:
        if self.pipeline is None:
            return None
        try:
            return list(self.pipeline.describe().get("tasks", []))
        except Exception:  # a describe() that fails must not break listing
            return []

    def to_json(self) -> dict:
        out = {"id": self.name, "object": "model", "created": int(self.loaded_at or 0), "owned_by": "qimg",
               "state": self.state, "tasks": self.tasks, "error": self.error}
        if self.pipeline is not None:
            try:
                out["details"] = {k: v for k, v in self.pipeline.describe().items() if k != "tasks"}
            except Exception:
                pass
            if out.get("details", {}).get("embedded"):  # what the page offers as placeholders and examples
                from qimg.tiny.grammar import EXAMPLES

                out["details"]["examples"] = EXAMPLES
        return out

    def warning(self, prompt: str | None, editing: bool) -> str | None:
        """For an embedded tiny model, a prompt its world cannot parse: drawn anyway, with this warning."""
        embedded = self.source is None or self.source in ("qimg-tiny", "qimg-tiny-layered")
        if self.pipeline is not None:
            try:
                embedded = bool(self.pipeline.describe().get("embedded"))
            except Exception:
                return None
        if not embedded or not prompt:
            return None
        from qimg.tiny.grammar import understands

        if understands(prompt, editing):
            return None
        return ("the embedded qimg-tiny only knows coloured circles, squares and triangles in a 3x3 grid on a plain "
                "background, with short words; it will not draw this prompt well (serve a real checkpoint with "
                "--model)")


class ModelRegistry:
    def __init__(self, sources: dict[str, str | None], *, load: LoadOptions | None = None,
                 pipelines: dict[str, object] | None = None):
        self.load_options = load or LoadOptions()
        self._entries: dict[str, ModelEntry] = {}
        for name, source in sources.items():
            self._entries[name] = ModelEntry(name, source)
        for name, pipe in (pipelines or {}).items():  # ready-made pipeline objects (embedding, tests)
            self._entries[name] = ModelEntry(name, None, pipe, "loaded", loaded_at=time.time())
        if not self._entries:
            raise ValueError("a server needs at least one model")

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry | None:
        return self._entries.get(name)

    def pick(self, name: str | None, task: str) -> str:
        """The model a request runs on: the named one, else the first one known (or not yet known) to do `task`."""
        if name not in (None, "", "auto"):
            entry = self._entries.get(name)
            if entry is None:
                raise bad_request(f"model {name!r} is not served here; available: {', '.join(self._entries)}",
                                  param="model", code="model_not_found")
            if entry.tasks is not None and task not in entry.tasks:
                does = ", ".join(entry.tasks) or "nothing"
                raise bad_request(f"model {name!r} does not do {task!r} (it does: {does})",
                                  param="model", code="unsupported_task")
            return name
        known = [e for e in self._entries.values() if e.tasks is not None and task in e.tasks]
        unknown = [e for e in self._entries.values() if e.tasks is None and e.state != "error"]
        if known:
            return known[0].name
        if unknown:
            return unknown[0].name
        broken = [e for e in self._entries.values() if e.state == "error"]
        if broken:
            raise ApiError(503, f"model {broken[0].name!r} could not be loaded: {broken[0].error}",
                           type="server_error", code="model_error")
        raise bad_request(f"no model on this server does {task!r}; models: "
                          + ", ".join(f"{e.name} ({', '.join(e.tasks or []) or e.state})" for e in self.entries()),
                          param="model", code="unsupported_task")

    def load(self, name: str):
        """The pipeline of `name`, loading it if needed (worker thread); raises the loading error. With offload,
        the other models' weights go back to the CPU first, so that the GPU holds one model's big component."""
        import qimg

        entry = self._entries[name]
        for other in self._entries.values():
            placement = getattr(other.pipeline, "placement", None)
            if other is not entry and placement is not None:
                placement.release()
        with entry.lock:
            if entry.pipeline is None:
                entry.state, entry.error = "loading", None
                try:
                    entry.pipeline = qimg.load(dataclasses.replace(self.load_options, model=entry.source))
                except BaseException as err:
                    entry.state, entry.error = "error", str(err)
                    raise
                entry.state, entry.loaded_at = "loaded", time.time()
            return entry.pipeline
