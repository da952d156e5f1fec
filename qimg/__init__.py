"""qimg: a self-hosted engine for the Qwen-Image family."""

__version__ = "0.1.0"


def load(model=None, *, task=None, dtype=None, device=None, offload=False):
    """Load a pipeline from a diffusers-layout folder, a cached repo id or an embedded model's name.

    With no model, the embedded tiny model for `task`: qimg-tiny-layered for "layers", else qimg-tiny.
    `offload`: keep the condition encoder and the transformer in CPU memory and move each onto the GPU only for
    its phase (one at a time), for GPUs too small to hold both; ignored on a CPU device.
    """
    from qimg.pipelines.registry import load_pipeline

    return load_pipeline(model, task=task, dtype=dtype, device=device, offload=offload)
