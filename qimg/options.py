"""What a caller asks for: how to load a model (`LoadOptions`) and what to make with it (`GenerateOptions` for
text-to-image and edits, `LayersOptions` for a layer split).

Each is validated once, where it is built (a Python call, the CLI parser, an HTTP request), with an InputError
naming the offending value. What depends on the model (its size multiple, how many images it takes, its
defaults) is settled when a pipeline plans the request. A job records `to_record()` and is rebuilt with
`from_record()`; callbacks and condition images are not part of the record.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qimg.errors import InputError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
TASKS = ("generate", "edit", "layers")
BACKGROUNDS = (None, "transparent", "opaque", "auto")
CAPTION_LANGUAGES = ("en", "zh")
LORA_MODES = ("fused", "unfused")
MAX_N = 16
MAX_STEPS = 1000
MAX_LAYERS_RANGE = (2, 10)
MIN_AREA, MAX_SIDE = 32 * 32, 4096
# Fields that are callables or pictures: given by the caller at run time, never recorded.
RUNTIME_FIELDS = ("images", "image", "progress", "cancel", "block_hook")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise InputError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_sigmas(sigmas) -> tuple[float, ...]:
    """A non-empty list of noise levels in (0, 1], without the terminal 0."""
    if isinstance(sigmas, str) or not hasattr(sigmas, "__iter__"):
        raise InputError(f"sigmas must be a list of numbers in (0, 1], got {sigmas!r}")
    values = tuple(sigmas)
    if not values or not all(_is_number(s) for s in values):
        raise InputError(f"sigmas must be a non-empty list of numbers in (0, 1], got {list(values)!r}")
    if not all(0 < s <= 1 for s in values):
        raise InputError(f"sigmas must lie in (0, 1], got {list(values)}")
    return tuple(float(s) for s in values)


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model.

    model: a checkpoint folder, a repo id in the Hugging Face cache, or an embedded model's name (None: the embedded
    model for `task`). dtype: "float32" | "bfloat16" | "float16" (None: float32 on CPU, bfloat16 on CUDA).
    offload: keep the encoder and transformer in CPU memory, each moved to the GPU for its phase (True or "model");
    "blocks": the encoder so, and the transformer's blocks streamed onto the GPU a few at a time, just ahead of use.
    attention: the transformer's attention backend (a name in `qimg.models.attention.BACKENDS`, or a callable).
    transforms: callables `(component, module) -> module | None` applied to each loaded component ("transformer",
    "vae", "text_encoder") after its weights are in and before it is placed on the device: where adapters and
    quantization plug in. preset: a few-step recipe (`qimg.sampling.presets`) the model's requests default to;
    None: detected from the model's (and its LoRAs') file names. loras: adapter files for the transformer, each a
    path, "FILE:SCALE", (path, scale) or `qimg.adapters.manager.LoraSpec`; lora_mode: "fused" (merged into the
    weights: full speed) or "unfused" (applied beside them: switching is free); lora_partial: load a file whose
    layers only partly match the model. transformer: a .gguf or single .safetensors file (diffusers or ComfyUI
    keys, any float dtype, scaled fp8) whose weights replace the folder's transformer; quantised Linear weights stay
    quantised and are dequantised just before use. quantize: "int8" or "fp8" weight-only quantisation of the
    transformer's Linear layers on load (after fused LoRAs are merged). batch_guidance: run both guidance branches
    as one transformer call where the family can (the same pictures; twice the activations of one call).
    text_encoder / vae: one .safetensors file each (transformers' or ComfyUI's key layouts, bf16/fp16/fp32 or scaled
    fp8; the folder still gives the configs) replacing that component's folder; fp8 Linear weights of an encoder stay
    fp8. quantize_encoder: "int8" or "fp8" weight-only quantisation of the condition encoder's Linear layers.
    compile: torch.compile the transformer: "blocks" (or True; regional: two graphs shared by every block, quick to
    compile at any size) or "step" (the whole denoising step as one graph: no Python between the layers, for small
    models and CPUs; one process, cancels land between steps); the first run at a size pays the compile time,
    reported as `compile_s`.
    parallel: "ulysses=U,cfg=C" (`qimg.parallel`): this process is one of U x C ranks started by torchrun that make
    each picture together; every rank gets the pictures (rank 0 should save them).
    """

    model: str | os.PathLike | None = None
    task: str | None = None
    dtype: Any = None
    device: str | None = None
    offload: bool | str = False
    attention: str | Callable = "sdpa"
    transforms: tuple[Callable, ...] = ()
    preset: str | None = None
    loras: tuple = ()
    lora_mode: str = "fused"
    lora_partial: bool = False
    download: bool = False  # fetch a repo id that is not in the Hugging Face cache (`qimg pull`) first
    transformer: str | os.PathLike | None = None  # one .gguf / .safetensors file replacing the folder's transformer
    quantize: str | None = None  # "int8" | "fp8": the transformer's Linear weights, weight-only, on load
    batch_guidance: bool = True  # both guidance branches in one transformer call (twice the activations)
    parallel: Any = None  # "ulysses=U,cfg=C" or a ParallelConfig: this process is one rank of a parallel run
    text_encoder: str | os.PathLike | None = None  # one .safetensors file replacing the folder's condition encoder
    vae: str | os.PathLike | None = None  # one .safetensors file replacing the folder's VAE
    quantize_encoder: str | None = None  # "int8" | "fp8": the condition encoder's Linear weights, on load
    compile: bool | str = False  # False, "blocks" (True) or "step" (qimg.models.compiled)

    def __post_init__(self):
        import torch

        from qimg.models.attention import attention_backend
        from qimg.sampling.presets import get_preset

        if self.task is not None and self.task not in TASKS:
            raise InputError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype) and self.dtype not in DTYPE_NAMES:
            raise InputError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise InputError(f"device must be cpu, cuda, cuda:N or mps, got {self.device!r}") from None
        if self.offload not in (True, False, "model", "blocks") or isinstance(self.offload, int) and not \
                isinstance(self.offload, bool):
            raise InputError(f"offload must be true/false, 'model' or 'blocks', got {self.offload!r}")
        attention_backend(self.attention)
        object.__setattr__(self, "transforms", tuple(self.transforms))
        if not all(callable(t) for t in self.transforms):
            raise InputError("transforms must be callables (component name, module) -> module")
        if self.preset is not None:
            get_preset(self.preset)
        from qimg.adapters.manager import LoraSpec

        if isinstance(self.loras, (str, os.PathLike, LoraSpec)):
            object.__setattr__(self, "loras", (self.loras,))
        object.__setattr__(self, "loras", tuple(LoraSpec.of(spec) for spec in self.loras))
        if self.lora_mode not in LORA_MODES:
            raise InputError(f"lora_mode must be one of {list(LORA_MODES)}, got {self.lora_mode!r}")
        if not isinstance(self.lora_partial, bool):
            raise InputError(f"lora_partial must be true or false, got {self.lora_partial!r}")
        if not isinstance(self.batch_guidance, bool):
            raise InputError(f"batch_guidance must be true or false, got {self.batch_guidance!r}")
        if self.quantize is not None and self.quantize not in ("int8", "fp8"):
            raise InputError(f"quantize must be 'int8' or 'fp8', got {self.quantize!r}")
        if self.quantize is not None and self.loras and self.lora_mode == "unfused":
            raise InputError("unfused LoRAs on quantized weights are not supported yet: use lora_mode 'fused' "
                             "(merged before quantizing)")
        from qimg.models.compiled import compile_mode

        object.__setattr__(self, "compile", compile_mode(self.compile))
        if self.quantize_encoder is not None and self.quantize_encoder not in ("int8", "fp8"):
            raise InputError(f"quantize_encoder must be 'int8' or 'fp8', got {self.quantize_encoder!r}")
        for name in ("text_encoder", "vae"):
            value = getattr(self, name)
            if value is not None and Path(value).suffix.lower() not in (".safetensors", ".gguf"):
                raise InputError(f"{name} must be a .safetensors file, got {str(value)!r}")
        from qimg.parallel.config import ParallelConfig

        object.__setattr__(self, "parallel", ParallelConfig.parse(self.parallel))
        if self.transformer is not None and Path(self.transformer).suffix.lower() not in (".gguf", ".safetensors"):
            raise InputError(f"transformer must be a .gguf or .safetensors file, got {str(self.transformer)!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    """What every request shares: the schedule, the sampler, guidance, the seed, and the caller's callbacks.

    sigmas: an explicit grid (without the terminal 0; the scheduler's shift still applies, as in the reference);
    scheduler: keys that override the checkpoint's scheduler_config.json; shift: a constant shift instead of the
    config's; preset: a named few-step recipe (explicit options win over it). cfg > 1 turns on true CFG (with the
    negative prompt " " when none is given); cfg_normalize: rescale the guided velocity to the conditional one's norm
    (None: the model's way). progress: called with `ProgressEvent`s; cancel: polled between steps, True stops the
    run with `qimg.errors.Cancelled`; block_hook: `(BlockStep, index, state, run) -> state`, see qimg.models.hooks;
    cache: a step cache, "fbcache", "magcache" or "NAME:THRESHOLD" (qimg.sampling.caches; None: every block, every
    step).
    """

    steps: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    cfg: float | None = None
    cfg_normalize: bool | None = None
    sigmas: tuple[float, ...] | None = None
    scheduler: dict | None = None
    shift: float | None = None
    preset: str | None = None
    sampler: str = "euler"
    progress: Callable | None = field(default=None, compare=False)
    cancel: Callable[[], bool] | None = field(default=None, compare=False)
    block_hook: Callable | None = field(default=None, compare=False)
    cache: str | None = None  # a step cache, "fbcache|magcache[:THRESHOLD]" (qimg.sampling.caches)

    def __post_init__(self):
        from qimg.sampling.presets import get_preset
        from qimg.sampling.samplers import SAMPLERS
        from qimg.sampling.schedule import SchedulerConfig

        if self.steps is not None:
            check_int("steps", self.steps, 1, MAX_STEPS)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise InputError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InputError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if self.cfg is not None:
            if not _is_number(self.cfg) or self.cfg < 0:
                raise InputError(f"cfg must be a number >= 0, got {self.cfg!r}")
            object.__setattr__(self, "cfg", float(self.cfg))
        if self.cfg_normalize is not None and not isinstance(self.cfg_normalize, bool):
            raise InputError(f"cfg_normalize must be true or false, got {self.cfg_normalize!r}")
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", check_sigmas(self.sigmas))
        if self.scheduler is not None:
            if not isinstance(self.scheduler, dict):
                raise InputError(f"scheduler must be a mapping of scheduler_config.json keys, got {self.scheduler!r}")
            SchedulerConfig().with_overrides(self.scheduler)  # names a bad key or value now, not at run time
        if self.shift is not None:
            if not _is_number(self.shift) or self.shift <= 0:
                raise InputError(f"shift must be a number > 0, got {self.shift!r}")
            object.__setattr__(self, "shift", float(self.shift))
        if self.preset is not None:
            get_preset(self.preset)
        if self.sampler not in SAMPLERS:
            raise InputError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")
        for name in ("progress", "cancel", "block_hook"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise InputError(f"{name} must be callable")
        if self.cache is not None:
            from qimg.sampling.caches import parse_cache

            spec = parse_cache(self.cache)
            object.__setattr__(self, "cache", None if spec is None else str(spec))

    def to_record(self) -> dict:
        """The JSON-able fields (not the callbacks or pictures); `images` counts the condition pictures."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUNTIME_FIELDS}
        if record.get("sigmas") is not None:
            record["sigmas"] = list(record["sigmas"])
        record["images"] = len(getattr(self, "images", ())) if not hasattr(self, "image") else 1
        return record

    @classmethod
    def from_record(cls, record: dict, images=(), **runtime):
        """Rebuild from `to_record()` (keys of other option kinds ignored) with the pictures and callbacks."""
        names = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
        values = {k: v for k, v in record.items() if k in names}
        if "image" in {f.name for f in dataclasses.fields(cls)}:
            values["image"] = images[0] if images else None
        else:
            values["images"] = tuple(images)
        return cls(**values, **runtime)

    def with_runtime(self, **runtime):
        """A copy with callbacks set (the server's progress and cancel flag)."""
        return dataclasses.replace(self, **runtime)


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(SamplingOptions):
    """Text-to-image (no images) or image-conditioned generation (edits).

    width/height: the output size (floored to the model's multiple); without them the model's default square, or
    with condition images the aspect of the last (Edit: the first) image at `resolution`^2 pixels. n: images per
    call. background: "opaque" flattens RGBA output onto white. use_kv_cache: the 2.x prefix cache (no effect on
    v1). vae_image_area / vlm_image_area: v1 Edit models only, the pixel areas condition images are encoded at.
    """

    prompt: str
    images: tuple = ()
    width: int | None = None
    height: int | None = None
    resolution: int | None = None
    n: int = 1
    background: str | None = None
    use_kv_cache: bool = True
    vae_image_area: int | None = None
    vlm_image_area: int | None = None

    def __post_init__(self):
        from qimg.imaging import check_image

        if not isinstance(self.prompt, str):
            raise InputError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise InputError("prompt is empty: describe the picture, or for an edit the change to make")
        super().__post_init__()
        object.__setattr__(self, "images", tuple(check_image(img, i) for i, img in enumerate(self.images or ())))
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if self.resolution is not None:
            check_int("resolution", self.resolution, 32, MAX_SIDE)
        check_int("n", self.n, 1, MAX_N)
        if self.background not in BACKGROUNDS:
            raise InputError(f"background must be 'transparent', 'opaque' or 'auto', got {self.background!r}")
        if not isinstance(self.use_kv_cache, bool):
            raise InputError(f"use_kv_cache must be true or false, got {self.use_kv_cache!r}")
        for name in ("vae_image_area", "vlm_image_area"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not MIN_AREA <= value <= MAX_SIDE**2):
                raise InputError(f"{name} must be an integer number of pixels from {MIN_AREA} to {MAX_SIDE ** 2}, "
                                 f"got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LayersOptions(SamplingOptions):
    """An image split into `layers` RGBA layers (Qwen-Image-Layered).

    resolution: the working size, about resolution^2 pixels (the model's buckets 640 or 1024; other multiples of 32
    for tests and previews, checked by the pipeline). prompt: a description (None or blank: the model captions the
    image in `caption_language`). recurse: split returned layer i again and put its sub-layers in its place.
    """

    image: Any
    layers: int = 4
    resolution: int | None = None
    prompt: str | None = None
    recurse: int | None = None
    caption_language: str = "en"

    def __post_init__(self):
        from qimg.imaging import check_image

        super().__post_init__()
        object.__setattr__(self, "image", check_image(self.image))
        low, high = MAX_LAYERS_RANGE
        check_int("layers", self.layers, low, high)
        if self.recurse is not None and (not _is_int(self.recurse) or not 0 <= self.recurse < self.layers):
            raise InputError(f"recurse must be the index of a returned layer, 0 to {self.layers - 1}, "
                             f"got {self.recurse!r}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InputError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.caption_language not in CAPTION_LANGUAGES:
            raise InputError(f"caption_language must be 'en' or 'zh', got {self.caption_language!r}")
        if self.resolution is not None and not _is_int(self.resolution):
            raise InputError(f"resolution must be an integer, got {self.resolution!r}")
