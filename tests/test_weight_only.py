"""Weight-only int8 / fp8 on load (`quantize=`, `--quantize`): one byte per weight with per-row scales, close to
float32 on the tiny reference, LoRAs merged before quantising, unfused LoRAs refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qimg
from qimg.errors import InputError
from qimg.lowbit.weight_only import ScaledLinear, quantize_linears


def psnr(a, b) -> float:
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(10 * np.log10(255**2 / max((d**2).mean(), 1e-12)))


@pytest.mark.parametrize("kind,relative", [("int8", 1 / 254), ("fp8", 1 / 16)])
def test_a_layer_keeps_one_byte_per_weight_and_its_rows(kind, relative):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    linear.weight.data[3] *= 50  # rows have their own scales: a large row does not swamp the others
    q = ScaledLinear(linear, kind)
    assert q.qweight.element_size() == 1 and q.qweight.shape == (40, 96) and q.scale.shape == (40, 1)
    w = linear.weight.detach()
    error = (q.dequantized(torch.float32) - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert error.max() <= relative
    x = torch.randn(5, 96)
    assert torch.allclose(q(x), torch.nn.functional.linear(x, q.dequantized(torch.float32), linear.bias))


@pytest.mark.parametrize("kind,floor", [("int8", 40.0), ("fp8", 30.0)])
def test_quantized_transformer_stays_close(ref21, kind, floor):
    _, folder = ref21
    plain = qimg.load(folder, dtype="float32", device="cpu")
    ours = qimg.load(folder, dtype="float32", device="cpu", quantize=kind)
    assert not any(type(m) is nn.Linear for m in ours.transformer.modules())
    a = plain.generate("a large red circle", width=64, height=64, steps=3, seed=5)[0]
    b = ours.generate("a large red circle", width=64, height=64, steps=3, seed=5)[0]
    assert floor <= psnr(a, b) < 200  # close, and not the same weights


def test_loras_are_merged_before_quantizing(ref21, tmp_path):
    from tests.lora_files import linear_shapes, random_lora, write_lora

    _, folder = ref21
    shapes = linear_shapes(qimg.load(folder, dtype="float32").transformer)
    lora = write_lora(tmp_path / "l.safetensors", random_lora(shapes, std=0.3))
    with_lora = qimg.load(folder, dtype="float32", loras=[(lora, 1.0)], quantize="int8")
    without = qimg.load(folder, dtype="float32", quantize="int8")
    a = with_lora.generate("a cat", width=64, height=64, steps=2, seed=1)[0]
    b = without.generate("a cat", width=64, height=64, steps=2, seed=1)[0]
    assert psnr(a, b) < 60
    with pytest.raises(InputError, match="unfused LoRAs on quantized weights are not supported"):
        qimg.load(folder, loras=[(lora, 1.0)], lora_mode="unfused", quantize="int8")
    with pytest.raises(InputError, match="quantize must be 'int8' or 'fp8'"):
        qimg.load(folder, quantize="int4")
    with pytest.raises(InputError, match="quantize must be one of"):
        quantize_linears(nn.Linear(2, 2), "int4")


def test_cli_quantize_flag(ref21, tmp_path):
    from PIL import Image

    from qimg.cli import main

    _, folder = ref21
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(folder), "--quantize", "fp8", "--size", "64x64",
                 "--steps", "2", "--seed", "3", "--dtype", "float32", "-o", str(out), "--quiet"]) == 0
    expected = qimg.load(folder, dtype="float32", quantize="fp8").generate("a red circle", width=64, height=64,
                                                                           steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))


def test_fp8_layers_run_a_real_fp8_product(monkeypatch):
    """An fp8 layer forced onto the fp8 product (the path a GPU with fp8 units takes; torch runs it on CPU too):
    activations quantised per token, `torch._scaled_mm` called, the result within e4m3's error of the
    dequantise-then-multiply product; per-tensor (ComfyUI) scales as well as per-row ones."""
    from torch import nn

    from qimg.lowbit.weight_only import ScaledLinear, quantize_weight

    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(2, 7, 64)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    per_row = ScaledLinear(linear, "fp8")
    values, scale = quantize_weight(linear.weight, "fp8", per_row=False)
    per_tensor = ScaledLinear.from_stored(values, scale, linear.bias.detach(), torch.float32)
    for layer in (per_row, per_tensor):
        layer.fp8_matmul = False
        plain = layer(x)
        layer.fp8_matmul = True
        fast = layer(x)
        assert fast.shape == plain.shape == (2, 7, 48)
        assert float((fast - plain).norm() / plain.norm()) < 0.05
    assert len(calls) == 2
    assert ScaledLinear(linear, "fp8").fp8_matmul is None  # auto: only where the device has fp8 units


def test_fp8_product_falls_back_where_the_kernel_refuses(monkeypatch):
    """Auto mode on a device whose fp8 kernels lack a scaling mode: one warning, then the dequantise path."""
    from torch import nn

    from qimg.lowbit import weight_only

    layer = weight_only.ScaledLinear(nn.Linear(32, 16).to(torch.bfloat16), "fp8")
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    expected = layer(x)  # auto on a CPU: dequantised
    monkeypatch.setattr(weight_only, "has_fp8_units", lambda device: True)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("scaling mode not supported on this device")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    with pytest.warns(RuntimeWarning, match="fp8 matmul unavailable here"):
        assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x), expected) and len(calls) == 1 and layer.fp8_matmul is False
