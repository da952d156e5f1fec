"""qimg: a self-hosted engine for the Qwen-Image family."""

__version__ = "0.1.0"


def load(model=None, **options):
    """Load a pipeline from a diffusers-layout folder, a cached repo id or an embedded model's name.

    The keywords are `qimg.options.LoadOptions`' fields (task, dtype, device, offload, attention, transforms,
    preset), or pass one `LoadOptions` as `model`. With no model, the embedded tiny model for `task`:
    qimg-tiny-layered for "layers", else qimg-tiny. `offload`: keep the condition encoder and the transformer in
    CPU memory and move each onto the GPU only for its phase (one at a time); ignored on a CPU device.
    """
    from qimg.options import LoadOptions
    from qimg.pipelines.registry import load_pipeline

    if isinstance(model, LoadOptions):
        if options:
            raise TypeError("pass either a LoadOptions or keyword options, not both")
        return load_pipeline(model)
    return load_pipeline(LoadOptions(model=model, **options))
