"""Output writers: single pictures (PNG with parameters, JPEG, WebP) and layer stacks (PSD, OpenRaster, PPTX,
ZIP)."""

from qimg.export.layers import composite, export_layers, read_layers

__all__ = ["composite", "export_layers", "read_layers"]
