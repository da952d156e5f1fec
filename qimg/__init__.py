"""qimg: a self-hosted engine for the Qwen-Image family."""

__version__ = "0.1.0"


def load(model=None, *, dtype=None, device=None):
    """Load a pipeline from a diffusers-layout folder or a cached repo id (None: the embedded tiny model)."""
    from qimg.pipelines.registry import load_pipeline

    return load_pipeline(model, dtype=dtype, device=device)
