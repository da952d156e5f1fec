"""One-file condition encoders and VAEs (`--text-encoder FILE`, `--vae FILE`, `quantize_encoder`): the layouts
people publish (transformers' original and current key names, ComfyUI's containers, no LM head, scaled fp8) give the
folder's picture (exactly for float32 files; fp8 weights stay fp8 and give the picture of their dequantised values);
files of another model are refused naming what does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import qimg
from qimg.errors import CheckpointError, InputError
from qimg.loading.weights import open_state_dict
from qimg.lowbit.weight_only import ScaledLinear


def picture(pipe, **kw):
    return np.asarray(pipe.generate("a red circle", width=64, height=64, steps=2, seed=3, cfg=1, **kw)[0], dtype=int)


def original_layout(sd: dict) -> dict:
    """transformers' current VLM names -> the original checkpoint's (`model.` language model, `visual.`)."""
    out = {}
    for key, t in sd.items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        out[key] = t.contiguous()
    return out


def scaled_fp8(sd: dict) -> tuple[dict, dict]:
    """ComfyUI's scaled fp8: 2-D weights as float8_e4m3fn with one `scale_weight` each; also their dequantised
    values (what the file means)."""
    out, meant = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, t in sd.items():
        if t.ndim == 2 and key.endswith(".weight") and "embed" not in key:
            scale = t.float().abs().max() / 448
            q = (t.float() / scale).to(torch.float8_e4m3fn)
            out[key], out[key[:-len(".weight")] + ".scale_weight"] = q, scale.reshape(1)
            meant[key] = q.float() * scale
        else:
            out[key] = meant[key] = t.contiguous()
    return out, meant


def test_v1_encoder_from_a_comfyui_file(ref_v1, tmp_path):
    folder = ref_v1["t2i"][1]
    sd = {k: v.float() for k, v in open_state_dict(folder / "text_encoder").items()}
    base = picture(qimg.load(folder, dtype="float32"))
    comfy = {f"text_encoders.qwen25_7b.transformer.{k}": v for k, v in original_layout(sd).items()
             if not k.startswith("lm_head.")}
    save_file(comfy, tmp_path / "te.safetensors")
    assert np.array_equal(picture(qimg.load(folder, dtype="float32", text_encoder=tmp_path / "te.safetensors")), base)

    fp8, meant = scaled_fp8(original_layout(sd))
    save_file(fp8, tmp_path / "te8.safetensors")
    pipe = qimg.load(folder, dtype="float32", text_encoder=tmp_path / "te8.safetensors")
    kept = [m for m in pipe.conditioner.model.modules() if isinstance(m, ScaledLinear)]
    assert kept and all(m.qweight.dtype == torch.float8_e4m3fn for m in kept)  # one byte per weight, as in the file
    save_file(meant, tmp_path / "meant.safetensors")
    same = qimg.load(folder, dtype="float32", text_encoder=tmp_path / "meant.safetensors")
    assert np.abs(picture(pipe) - picture(same)).max() <= 1


def test_file_without_lm_head_cannot_caption(ref_layered, tmp_path):
    folder = ref_layered[1]
    sd = {k: v for k, v in open_state_dict(folder / "text_encoder").items() if not k.startswith("lm_head.")}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "te.safetensors")
    pipe = qimg.load(folder, dtype="float32", text_encoder=tmp_path / "te.safetensors")
    image = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    with pytest.raises(InputError, match="no LM head .* give a prompt"):
        pipe.layers(image, layers=2, resolution=64, steps=1)
    assert len(pipe.layers(image, prompt="a red card", layers=2, resolution=64, steps=1)) == 2


def test_21_encoder_and_vae_files(ref21, tmp_path):
    folder = ref21[1]
    base = qimg.load(folder, dtype="float32")
    expected = picture(base)
    te = {k: v.float().contiguous() for k, v in open_state_dict(folder / "text_encoder").items()}
    save_file(te, tmp_path / "te.safetensors")
    vae = {f"vae.{k}": v.float().contiguous() for k, v in open_state_dict(folder / "vae").items()}
    save_file(vae, tmp_path / "vae.safetensors")
    both = qimg.load(folder, dtype="float32", text_encoder=tmp_path / "te.safetensors",
                     vae=tmp_path / "vae.safetensors")
    assert np.array_equal(picture(both), expected)
    save_file({k: v.half() for k, v in vae.items()}, tmp_path / "vae16.safetensors")
    half = picture(qimg.load(folder, dtype="float32", vae=tmp_path / "vae16.safetensors"))
    assert 0 < np.abs(half - expected).max() <= 3  # fp16 weights, float32 run: close, not equal

    small = qimg.load(folder, dtype="float32", quantize_encoder="int8")
    assert any(isinstance(m, ScaledLinear) for m in small.conditioner.model.modules())
    d = picture(small) - expected
    assert 10 * np.log10(255**2 / max((d.astype(float) ** 2).mean(), 1e-12)) > 25


def test_files_of_another_model_are_refused(ref21, ref_v1, tmp_path):
    v1 = ref_v1["t2i"][1]
    save_file({k: v.contiguous() for k, v in open_state_dict(v1 / "text_encoder").items()},
              tmp_path / "v1te.safetensors")
    with pytest.raises(CheckpointError, match=r"v1te.safetensors: not this model's text encoder \(qwen3_vl\)"):
        qimg.load(ref21[1], dtype="float32", text_encoder=tmp_path / "v1te.safetensors")
    save_file({k: v.contiguous() for k, v in open_state_dict(v1 / "vae").items()}, tmp_path / "v1vae.safetensors")
    with pytest.raises(CheckpointError, match="v1vae.safetensors: not this model's VAE"):
        qimg.load(ref21[1], dtype="float32", vae=tmp_path / "v1vae.safetensors")
    (tmp_path / "te.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="GGUF text encoders are not read yet"):
        qimg.load(ref21[1], dtype="float32", text_encoder=tmp_path / "te.gguf")
    with pytest.raises(InputError, match="vae must be a .safetensors file"):
        qimg.load(ref21[1], vae=tmp_path / "vae.bin")
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        qimg.load(ref21[1], dtype="float32", vae=tmp_path / "missing.safetensors")


def test_cli_flags(ref21, tmp_path):
    from qimg.cli import main

    folder = ref21[1]
    save_file({f"vae.{k}": v.contiguous() for k, v in open_state_dict(folder / "vae").items()},
              tmp_path / "vae.safetensors")
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(folder), "--vae", str(tmp_path / "vae.safetensors"),
                 "--quantize-encoder", "fp8", "--size", "64x64", "--steps", "2", "--seed", "3", "-o", str(out),
                 "--quiet"]) == 0
    expected = qimg.load(folder, vae=tmp_path / "vae.safetensors", quantize_encoder="fp8").generate(
        "a red circle", width=64, height=64, steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
