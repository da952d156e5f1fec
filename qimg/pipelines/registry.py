"""model_index.json `_class_name` -> the qimg pipeline that runs it."""

from __future__ import annotations

import importlib

from qimg.errors import CheckpointError
from qimg.loading.files import read_model_index, resolve_model
from qimg.options import LoadOptions

# class name -> (module, class) of the qimg pipeline
PIPELINES = {
    "QwenImage21Pipeline": ("qimg.pipelines.qwenimage21", "QwenImage21Pipeline"),
    "QwenImagePipeline": ("qimg.pipelines.qwenimage", "QwenImagePipeline"),
    "QwenImageEditPipeline": ("qimg.pipelines.qwenimage", "QwenImageEditPipeline"),
    "QwenImageEditPlusPipeline": ("qimg.pipelines.qwenimage", "QwenImageEditPlusPipeline"),
    "QwenImageLayeredPipeline": ("qimg.pipelines.layered", "QwenImageLayeredPipeline"),
}


def pipeline_class(name: str):
    if name not in PIPELINES:
        raise CheckpointError(f"unknown pipeline class {name!r} in model_index.json; qimg runs {sorted(PIPELINES)}")
    module, cls = PIPELINES[name]
    return getattr(importlib.import_module(module), cls)


def load_pipeline(options: LoadOptions):
    folder = resolve_model(options.model, options.task, download=options.download)
    index = read_model_index(folder)
    name = index.get("_class_name")
    if not name:
        raise CheckpointError(f"{folder / 'model_index.json'} has no _class_name")
    return pipeline_class(name).load(folder, index, options)
