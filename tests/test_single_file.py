"""Single-file safetensors transformers (`--transformer FILE.safetensors`): ComfyUI key prefixes, bfloat16 files and
"scaled fp8" (float8_e4m3fn weights with a per-tensor `scale_weight`), checked against the reference running the
same weights as float32, and one-line refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qimg
from qimg.errors import CheckpointError
from qimg.loading.weights import open_state_dict
from qimg.lowbit.weight_only import ScaledLinear


def max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def scaled_fp8(sd: dict) -> tuple[dict, dict]:
    """(ComfyUI scaled-fp8 file content, the float32 weights it stands for)."""
    out, meaning = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, t in sd.items():
        t = t.float()
        if t.ndim == 2 and key.endswith(".weight"):
            scale = t.abs().max().clamp_min(1e-12) / 448
            q = (t / scale).to(torch.float8_e4m3fn)
            out[f"model.diffusion_model.{key}"] = q
            out[f"model.diffusion_model.{key[:-len('.weight')]}.scale_weight"] = scale.reshape(1)
            meaning[key] = q.float() * scale
        else:
            out[f"model.diffusion_model.{key}"] = t.to(torch.bfloat16)
            meaning[key] = t.to(torch.bfloat16).float()
    return out, meaning


def reference_with(ref, weights: dict):
    twin = copy.copy(ref)
    twin.transformer = copy.deepcopy(ref.transformer)
    twin.transformer.load_state_dict(weights)
    return twin


@pytest.mark.parametrize("family", ["2.x", "v1"])
def test_scaled_fp8_comfy_file_matches_the_reference_on_its_weights(family, ref21, ref_v1, tmp_path):
    ref, folder = ref21 if family == "2.x" else ref_v1["t2i"]
    content, meaning = scaled_fp8(open_state_dict(folder / "transformer"))
    path = tmp_path / "transformer_fp8_scaled.safetensors"
    save_file(content, str(path))
    ours = qimg.load(folder, dtype="float32", device="cpu", transformer=path)
    fp8 = [m for m in ours.transformer.modules() if isinstance(m, ScaledLinear)]
    assert fp8 and all(m.qweight.dtype == torch.float8_e4m3fn for m in fp8)
    cfg = {} if family == "2.x" else {"cfg": 1}
    got = ours.generate("a large red circle", width=96, height=64, steps=3, seed=11, **cfg)[0]
    expected = reference_with(ref, meaning)("a large red circle", height=64, width=96, num_inference_steps=3,
                                            generator=torch.Generator().manual_seed(11)).images[0]
    assert max_diff(got, expected) <= 2


def test_a_bf16_file_with_diffusion_model_prefix(ref21, tmp_path):
    ref, folder = ref21
    sd = open_state_dict(folder / "transformer")
    path = tmp_path / "t.safetensors"
    save_file({f"diffusion_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    ours = qimg.load(folder, dtype="float32", transformer=path)
    expected = reference_with(ref, {k: v.to(torch.bfloat16).float() for k, v in sd.items()})
    got = ours.generate("a blue square", width=64, height=64, steps=2, seed=3)[0]
    want = expected("a blue square", height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(3)).images[0]
    assert max_diff(got, want) <= 2


def test_refusals(ref21, ref_v1, tmp_path):
    _, folder = ref21
    sd = dict(open_state_dict(folder / "transformer"))
    half = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in list(sd.items())[: len(sd) // 2]}, str(half))
    with pytest.raises(CheckpointError, match=r"half.safetensors: not this model's transformer: \d+ of"):
        qimg.load(folder, dtype="float32", transformer=half)
    other = tmp_path / "v1.safetensors"
    save_file({k: v.contiguous() for k, v in open_state_dict(ref_v1["t2i"][1] / "transformer").items()}, str(other))
    with pytest.raises(CheckpointError, match="v1.safetensors: not this model's transformer"):
        qimg.load(folder, dtype="float32", transformer=other)
    stray = tmp_path / "stray.safetensors"
    save_file({**{k: v.contiguous() for k, v in sd.items()}, "nothing.scale_weight": torch.ones(1)}, str(stray))
    with pytest.raises(CheckpointError, match="scale_weight for tensors the file does not hold: nothing"):
        qimg.load(folder, dtype="float32", transformer=stray)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        qimg.load(folder, dtype="float32", transformer=broken)


@pytest.mark.parametrize("fmt,floor", [("gguf-q8_0", 40), ("gguf-q4_0", 20), ("gguf-q4_k", 20), ("fp8", 30),
                                       ("int8", 40)])
def test_qimg_quantize_writes_what_transformer_loads(ref21, tmp_path, capsys, fmt, floor):
    from qimg.cli import main

    _, folder = ref21
    out = tmp_path / ("t.gguf" if fmt.startswith("gguf") else "t.safetensors")
    assert main(["quantize", str(folder), str(out), "--format", fmt, "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    plain = qimg.load(folder, dtype="float32").generate("a red circle", width=64, height=64, steps=2, seed=1)[0]
    small = qimg.load(folder, dtype="float32", transformer=out).generate("a red circle", width=64, height=64,
                                                                        steps=2, seed=1)[0]
    d = np.asarray(plain, dtype=float) - np.asarray(small, dtype=float)
    assert floor <= 10 * np.log10(255**2 / max((d**2).mean(), 1e-12)) < 200
    assert main(["quantize", str(folder), str(tmp_path / "t.gguf"), "--format", "fp8"]) == 2
    assert "format fp8 writes a .safetensors file" in capsys.readouterr().err
