"""Sub-commands beyond generate/edit/info register here (each adds a parser with a `handler`)."""

from __future__ import annotations


def register(sub) -> None:
    """Add the optional sub-commands (layers, tiny, serve) that exist in this build."""
    import importlib

    for module in ("qimg.tiny.cli", "qimg.serve.cli", "qimg.pipelines.layers_cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        mod.register(sub)
