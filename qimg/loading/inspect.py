"""`qimg info`: what a checkpoint folder holds, read from its configs and safetensors headers (nothing loaded)."""

from __future__ import annotations

from collections import Counter

from qimg.loading.files import embedded_name, read_model_index, resolve_model
from qimg.loading.weights import open_state_dict


def describe_checkpoint(model=None) -> dict:
    folder = resolve_model(model)
    index = read_model_index(folder)
    components = {}
    for name, spec in sorted(index.items()):
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
            continue
        comp = {"library": spec[0], "class": spec[1]}
        sub = folder / name
        if sub.is_dir() and any(sub.glob("*.safetensors")):
            tensors = open_state_dict(sub, None)
            dtypes, params, nbytes = Counter(), 0, 0
            for t in tensors.values():
                params += t.numel()
                nbytes += t.numel() * t.element_size()
                dtypes[str(t.dtype).replace("torch.", "")] += t.numel()
            comp.update(parameters=params, bytes=nbytes, dtypes=dict(dtypes), tensors=len(tensors))
            del tensors
        components[name] = comp
    return {"folder": str(folder), "pipeline": index.get("_class_name"), "embedded": embedded_name(folder),
            "components": components}
