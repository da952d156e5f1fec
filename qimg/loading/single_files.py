"""Condition encoders and VAEs from one file (`--text-encoder FILE`, `--vae FILE`), the folder still deciding the
config: .safetensors in the layouts people publish them (transformers' current or original key names, the
containers' prefixes ComfyUI files carry), bf16 / fp16 / fp32, or fp8 e4m3 with ComfyUI's per-tensor `scale_weight`
("scaled fp8"). fp8 Linear weights of an encoder stay fp8 (weight-only, exactly the file's bytes and scale); every
other tensor takes the run's dtype. A file of another model or size is refused naming what does not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from qimg.errors import CheckpointError

# containers around an encoder's own key names in single files (ComfyUI text-encoder and all-in-one checkpoints)
TEXT_PREFIXES = ("text_encoders.qwen25_7b.transformer.", "text_encoders.qwen3vl.transformer.", "text_encoder.",
                 "cond_stage_model.transformer.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


# llama.cpp's names for the parts of a Qwen2/Qwen3 language model -> transformers' (original layout)
LLAMA_CPP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_CPP_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                   "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}


def llama_cpp_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None for a name it does not know)."""
    base, _, part = name.rpartition(".")
    if base in LLAMA_CPP:
        return f"{LLAMA_CPP[base]}.{part}"
    pieces = base.split(".")
    if len(pieces) == 3 and pieces[0] == "blk" and pieces[2] in LLAMA_CPP_BLOCK:
        return f"model.layers.{pieces[1]}.{LLAMA_CPP_BLOCK[pieces[2]]}.{part}"
    return None


def check_file(path: str | Path, component: str, gguf: bool = False) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (the {component} to load)")
    if path.suffix.lower() == ".gguf" and gguf:
        return path
    if path.suffix.lower() == ".gguf":
        raise CheckpointError(f"{path}: GGUF {component}s are not read; give a .safetensors file (bf16, fp16, "
                              f"fp32 or scaled fp8)")
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{path}: the {component} must be a .safetensors file, got {path.suffix or 'no suffix'}")
    return path


def _unprefixed(raw: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, tensor in raw.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = tensor
    return out


def split_scaled(tensors: dict) -> tuple[dict, dict]:
    """(tensors, {owner: scale_weight}) without ComfyUI's markers (`scaled_fp8`, `scale_input`)."""
    plain, scales = {}, {}
    for key, tensor in tensors.items():
        if key == "scaled_fp8" or key.endswith(".scale_input"):
            continue
        if key.endswith(".scale_weight"):
            scales[key[: -len(".scale_weight")]] = tensor
        else:
            plain[key] = tensor
    return plain, scales


def vlm_from_file(model_class, config_folder: Path, path: str | Path, *, dtype: torch.dtype, device):
    """A transformers VLM (`model_class`) built from `config_folder`'s config.json with `path`'s weights; returns
    (model, whether the file had the LM head). A file without the LM head (ComfyUI keeps encoders without it) loads
    for encoding; captioning then needs a head it does not have."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from qimg.loading.weights import open_state_dict

    path = check_file(path, "text encoder", gguf=True)
    if path.suffix.lower() == ".gguf":
        tensors, quantized = language_model_gguf(path, config_folder)
        state = {k: t.dequantize(dtype) if k in quantized else t.to(dtype) for k, t in tensors.items()}
        keep = {k: (lambda bias, t=quantized[k]: _quant_linear(t, bias, dtype)) for k in quantized}
    else:
        tensors, scales = split_scaled(_unprefixed(open_state_dict(path), TEXT_PREFIXES))
        fp8_weights = {k: t for k, t in tensors.items() if t.dtype in FP8 and k.endswith(".weight") and t.ndim == 2}
        state = {k: (t.float() * scales.get(k[: -len(".weight")], torch.ones(())).float()).to(dtype)
                 if k in fp8_weights else t.to(dtype) for k, t in tensors.items()}
        keep = {k: (lambda bias, k=k: _scaled_linear(fp8_weights[k], scales.get(k[: -len(".weight")]), bias, dtype))
                for k in fp8_weights}
    config = AutoConfig.from_pretrained(str(config_folder))
    check_against(model_class, config, state, path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    del state
    keep_quantized(model, keep)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(getattr(config, "text_config", None),
                                                                     "tie_word_embeddings", False)
    has_head = tied or any(canonical(k).startswith("lm_head.") for k in tensors)  # a tied head is the embedding
    return model.to(device).eval().requires_grad_(False), has_head


def check_against(model_class, config, state: dict, path: Path) -> None:
    """The file's tensors (by their canonical names) are the model's at its shapes, the LM head optional; else
    CheckpointError naming what is missing, extra or of another size."""
    from qimg.lowbit.load import check_keys

    with torch.device("meta"):
        expected = {canonical(k): tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    check_keys(path, expected, {canonical(k): tuple(v.shape) for k, v in state.items()},
               f"text encoder ({config.model_type})", optional=lambda key: key.startswith("lm_head."))


def canonical(key: str) -> str:
    """One name for a VLM tensor in either transformers layout (current `model.language_model.` / `model.visual.`,
    or the original `model.` / `visual.`)."""
    for old, new in (("model.language_model.", "language."), ("model.visual.", "visual."), ("model.", "language.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _scaled_linear(weight, scale, bias, dtype):
    from qimg.lowbit.weight_only import ScaledLinear

    return ScaledLinear.from_stored(weight, torch.ones(()) if scale is None else scale, bias, dtype)


def _quant_linear(tensor, bias, dtype):
    from qimg.lowbit.layers import QuantLinear

    return QuantLinear(tensor, bias, dtype)


def keep_quantized(model: nn.Module, keep: dict[str, Callable]) -> None:
    """The Linear layers whose file weights were quantised (fp8, GGUF blocks) hold those bytes again, not the
    dequantised copy transformers loaded: `keep` maps a file key to `make(bias) -> layer`."""
    by_name = {canonical(k): make for k, make in keep.items()}
    for name, sub in list(model.named_modules()):
        make = by_name.get(canonical(f"{name}.weight"))
        if type(sub) is nn.Linear and make is not None:
            model.set_submodule(name, make(None if sub.bias is None else sub.bias.detach()))


def language_model_gguf(path: Path, config_folder: Path) -> tuple[dict, dict]:
    """A llama.cpp GGUF of the VLM's language model, as (tensors by transformers name: the GGUF's language model
    and the folder's vision tower, {name: QuantTensor} of the quantised Linear weights). The vision tower is not in
    the GGUF (llama.cpp keeps it in a separate mmproj file): the folder's own is used."""
    from qimg.loading.weights import open_state_dict
    from qimg.lowbit.gguf_file import read_gguf
    from qimg.lowbit.load import some_names

    tensors, quantized, unknown = {}, {}, []
    for name, tensor in read_gguf(path, language_model=True).items():
        key = llama_cpp_name(name)
        if key is None:
            unknown.append(name)
            continue
        tensors[key] = tensor
        if tensor.quantized and key.endswith(".weight") and len(tensor.shape) == 2 and "embed_tokens" not in key:
            quantized[key] = tensor
    if unknown:
        raise CheckpointError(f"{path}: tensors qimg cannot place in a Qwen language model: {some_names(unknown)}")
    tensors = {k: (t if k in quantized else t.dequantize()) for k, t in tensors.items()}
    folder = open_state_dict(config_folder)
    tensors.update({k: v for k, v in folder.items() if canonical(k).startswith("visual.")})
    return tensors, quantized


def vae_from_file(factory: Callable[[], nn.Module], path: str | Path, *, dtype: torch.dtype, device) -> nn.Module:
    """A qimg VAE (the folder's config) with `path`'s weights in the diffusers layout (container prefixes allowed;
    fp8 tensors upcast with their scale)."""
    from qimg.lowbit.load import load_safetensors_module

    path = check_file(path, "VAE")
    return load_safetensors_module(factory, path, dtype=dtype, device=device, component="VAE",
                                   prefixes=VAE_PREFIXES, keep_quantized=False)
