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
    with pytest.raises(CheckpointError, match="te.gguf: not a readable GGUF file"):
        qimg.load(ref21[1], dtype="float32", text_encoder=tmp_path / "te.gguf")
    with pytest.raises(CheckpointError, match="GGUF VAEs are not read"):
        qimg.load(ref21[1], dtype="float32", vae=tmp_path / "te.gguf")
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


LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm"}


def llama_cpp_gguf(sd: dict, path, arch: str = "qwen2vl") -> dict:
    """The language model of a transformers VLM state dict as llama.cpp names it (its Linear weights Q8_0, the rest
    F32; the vision tower left out, as llama.cpp keeps it in an mmproj file); returns what the file means."""
    import itertools

    from qimg.lowbit.write import write_gguf

    out = {}
    for key, t in original_layout(sd).items():
        if key.startswith("visual."):
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            layer, rest = key[len("model.layers."):].split(".", 1)
            base, part = rest.rsplit(".", 1)
            name = f"blk.{layer}.{LLAMA_CPP_NAMES[base]}.{part}"
        out[name] = t.float()
    kinds = itertools.cycle(["Q8_0", "F16"])
    write_gguf(out, path, lambda name, t: next(kinds) if t.ndim == 2 and name.startswith("blk.") else "F32", arch=arch)
    from qimg.lowbit.gguf_file import read_gguf

    return {k: t.dequantize(torch.float32) for k, t in read_gguf(path, language_model=True).items()}


@pytest.mark.parametrize("family", ["v1", "2.x"])
def test_language_model_from_a_llama_cpp_gguf(family, ref_v1, ref21, tmp_path):
    """A llama.cpp GGUF of the encoder's language model (Qwen2.5-VL's, Qwen3-VL's with its q/k norms; the vision
    tower comes from the folder): its quantised Linear weights stay quantised, and an edit's picture is the one of a
    safetensors file holding the same values."""
    from qimg.lowbit.layers import QuantLinear

    folder = ref_v1["edit_plus_2511"][1] if family == "v1" else ref21[1]
    sd = {k: v.float() for k, v in open_state_dict(folder / "text_encoder").items()}
    meant = llama_cpp_gguf(sd, tmp_path / "lm.gguf", arch="qwen2vl" if family == "v1" else "qwen3vl")
    pipe = qimg.load(folder, dtype="float32", text_encoder=tmp_path / "lm.gguf")
    assert any(isinstance(m, QuantLinear) for m in pipe.conditioner.model.modules())
    assert not any(isinstance(m, QuantLinear) for m in pipe.conditioner.model.model.visual.modules())
    names = {v: k for k, v in LLAMA_CPP_NAMES.items()}
    same = dict(original_layout(sd))
    for name, value in meant.items():
        if name.startswith("blk."):
            _, layer, base, part = name.split(".")
            same[f"model.layers.{layer}.{names[base]}.{part}"] = value
        else:
            same[{"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}[name]] = value
    save_file({k: v.contiguous() for k, v in same.items()}, tmp_path / "same.safetensors")
    twin = qimg.load(folder, dtype="float32", text_encoder=tmp_path / "same.safetensors")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    a = np.asarray(pipe.generate("make it blue", images=[image], width=64, height=64, steps=2, seed=1, cfg=1)[0])
    b = np.asarray(twin.generate("make it blue", images=[image], width=64, height=64, steps=2, seed=1, cfg=1)[0])
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(CheckpointError, match="not a language model's GGUF"):
        from qimg.lowbit.write import write_gguf

        write_gguf({"img_in.weight": torch.zeros(4, 32)}, tmp_path / "dit.gguf", lambda n, t: "F32")
        qimg.load(folder, dtype="float32", text_encoder=tmp_path / "dit.gguf")
