"""GGUF files as component weights: the tensors (memory-mapped, still quantised), checked against the module they
fill. Diffusion GGUFs (city96's Qwen-Image files, `qimg quantize`) name tensors as the diffusers state dict does,
optionally under ComfyUI's `model.diffusion_model.` / `diffusion_model.` prefixes; ComfyUI-GGUF records the true
shape of a reshaped tensor as `comfy.gguf.orig_shape.<name>`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qimg.errors import CheckpointError
from qimg.lowbit.gguf_blocks import FORMATS, dequantize

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
LANGUAGE_MODELS = ("llama", "qwen2", "qwen3", "gemma", "mistral", "phi", "gpt", "falcon", "mamba", "t5", "bert",
                   "deepseek", "command-r", "starcoder", "olmo", "internlm", "baichuan", "chatglm")


@dataclass
class QuantTensor:
    """One tensor of a GGUF file: its bytes as they are in the file (uint8, memory-mapped), format and shape."""

    raw: torch.Tensor
    kind: str
    shape: tuple[int, ...]

    @property
    def quantized(self) -> bool:
        return self.kind not in ("F32", "F16", "BF16")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.raw, self.kind, self.shape, dtype or torch.float32)


def read_gguf(path: str | Path, language_model: bool = False) -> dict[str, QuantTensor]:
    """The file's tensors by (unprefixed) name; CheckpointError naming the file and the problem for a file that is
    not a readable GGUF, a tensor in a format qimg does not read, or a language model (with `language_model`: a
    file that is not one)."""
    path = Path(path)
    try:
        from gguf import GGUFReader
    except ModuleNotFoundError:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package (pip install 'qimg[lowbit]')") \
            from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        reader = GGUFReader(path, "r")
    except Exception as err:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or damaged? {type(err).__name__}: "
                              f"{err})") from None
    fields = {name: field for name, field in reader.fields.items()}
    arch = _text(fields.get("general.architecture"))
    is_language_model = "tokenizer.ggml.model" in fields or bool(arch and arch.startswith(LANGUAGE_MODELS))
    if is_language_model and not language_model:
        raise CheckpointError(f"{path}: a GGUF of a language model (architecture {arch!r}), not a diffusion "
                              f"transformer")
    if language_model and not is_language_model:
        raise CheckpointError(f"{path}: not a language model's GGUF (architecture {arch!r}); a text encoder GGUF "
                              f"is a llama.cpp file of the Qwen-VL language model")
    tensors = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        name = tensor.name
        if kind not in FORMATS:
            raise CheckpointError(f"{path}: tensor {name} is stored as {kind}, a quantization type qimg does not read "
                                  f"(it reads {', '.join(FORMATS)})")
        shape = _orig_shape(fields, name) or tuple(int(n) for n in reversed(tensor.shape.tolist()))
        with warnings.catch_warnings():  # the memory map is read-only; qimg never writes through it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.asarray(tensor.data).reshape(-1).view(np.uint8))
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        tensors[name] = QuantTensor(raw, kind, shape)
    if not tensors:
        raise CheckpointError(f"{path}: the GGUF file holds no tensors")
    return tensors


def _text(field) -> str | None:
    if field is None:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (IndexError, UnicodeDecodeError, TypeError):
        return None


def _orig_shape(fields: dict, name: str) -> tuple[int, ...] | None:
    field = fields.get(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    return tuple(int(field.parts[i][0]) for i in field.data)
