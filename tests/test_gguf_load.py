"""A transformer from one GGUF file (`qimg.load(folder, transformer=FILE)`, `--transformer FILE`): mixed block types
written with the `gguf` package's quantisers; the picture equals the reference's within 2/255 when the reference
runs the same weights dequantised to float32. Bad files are refused in one line naming the file and the problem."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gguf")

import qimg  # noqa: E402
from qimg.errors import CheckpointError, InputError  # noqa: E402
from qimg.loading.weights import open_state_dict  # noqa: E402
from qimg.lowbit.gguf_file import read_gguf  # noqa: E402
from qimg.lowbit.layers import QuantLinear  # noqa: E402
from qimg.lowbit.write import write_gguf  # noqa: E402

MIXED = ["Q8_0", "Q4_0", "Q5_1", "Q4_1", "Q5_0", "F16", "BF16"]


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max())


def mixed_gguf(folder, path) -> dict[str, str]:
    """The folder's transformer as a GGUF whose Linear weights cycle through MIXED (norms etc. stay F32)."""
    sd = {k: v.float().clone() for k, v in open_state_dict(folder / "transformer").items()}
    kinds = itertools.cycle(MIXED)
    return write_gguf(sd, path, lambda name, t: next(kinds) if t.ndim == 2 and name.endswith(".weight") else "F32")


def reference_on(ref, path):
    """The reference pipeline with its transformer's weights replaced by the file's, dequantised to float32."""
    twin = copy.copy(ref)
    twin.transformer = copy.deepcopy(ref.transformer)
    twin.transformer.load_state_dict({k: t.dequantize(torch.float32) for k, t in read_gguf(path).items()})
    return twin


@pytest.mark.parametrize("family", ["2.x", "v1"])
def test_gguf_transformer_matches_the_reference_on_its_weights(family, ref21, ref_v1, tmp_path):
    ref, folder = ref21 if family == "2.x" else ref_v1["t2i"]
    path = tmp_path / "transformer.gguf"
    kinds = mixed_gguf(folder, path)
    assert set(MIXED) <= set(kinds.values())
    ours = qimg.load(folder, dtype="float32", device="cpu", transformer=path)
    layers = [m for m in ours.transformer.modules() if isinstance(m, QuantLinear)]
    assert {m.kind for m in layers} == set(MIXED) - {"F16", "BF16"}  # the quantised ones stay quantised
    cfg = {} if family == "2.x" else {"cfg": 1}
    got = ours.generate("a large red circle", width=96, height=64, steps=3, seed=11, **cfg)[0]
    expected = reference_on(ref, path)("a large red circle", height=64, width=96, num_inference_steps=3,
                                       generator=torch.Generator().manual_seed(11)).images[0]
    assert max_diff(got, expected) <= 2
    plain = qimg.load(folder, dtype="float32", device="cpu").generate("a large red circle", width=96, height=64,
                                                                      steps=3, seed=11, **cfg)[0]
    assert max_diff(got, plain) > 0  # the quantised weights are what ran


def test_bad_files_are_refused_in_one_line(ref21, ref_v1, tmp_path):
    _, folder = ref21
    good = tmp_path / "good.gguf"
    mixed_gguf(folder, good)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf: not a readable GGUF file"):
        qimg.load(folder, dtype="float32", transformer=truncated)
    other = tmp_path / "v1.gguf"
    mixed_gguf(ref_v1["t2i"][1], other)  # a v1 transformer for a 2.x folder
    with pytest.raises(CheckpointError, match=r"v1.gguf: not this model's transformer: .* another family"):
        qimg.load(folder, dtype="float32", transformer=other)
    half = tmp_path / "half.gguf"
    sd = dict(open_state_dict(folder / "transformer"))
    write_gguf(dict(list(sd.items())[: len(sd) // 2]), half, lambda n, t: "F32")
    with pytest.raises(CheckpointError, match=r"half.gguf: not this model's transformer: \d+ of the transformer's"):
        qimg.load(folder, dtype="float32", transformer=half)
    llm = tmp_path / "llm.gguf"
    write_gguf({"token_embd.weight": torch.randn(8, 32)}, llm, lambda n, t: "F32", arch="qwen3")
    with pytest.raises(CheckpointError, match="llm.gguf: a GGUF of a language model"):
        qimg.load(folder, dtype="float32", transformer=llm)
    with pytest.raises(InputError, match="transformer must be a .gguf or .safetensors file"):
        qimg.load(folder, transformer=tmp_path / "x.ckpt")


def test_unknown_quant_type_is_named(ref21, tmp_path):
    gguf = pytest.importorskip("gguf")
    _, folder = ref21
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(path, "qwen_image")
    writer.add_tensor("img_in.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="tensor img_in.weight is stored as IQ2_XXS, a quantization type qimg"):
        qimg.load(folder, dtype="float32", transformer=path)


def test_cli_transformer_flag(ref21, tmp_path, capsys):
    from qimg.cli import main

    _, folder = ref21
    path = tmp_path / "t.gguf"
    mixed_gguf(folder, path)
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(folder), "--transformer", str(path), "--size", "64x64",
                 "--steps", "2", "--seed", "3", "--dtype", "float32", "-o", str(out), "--quiet"]) == 0
    expected = qimg.load(folder, dtype="float32", transformer=path).generate("a red circle", width=64, height=64,
                                                                             steps=2, seed=3)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(["generate", "x", "--model", str(folder), "--transformer", str(tmp_path / "none.gguf")]) != 0
    assert "none.gguf: no such file" in capsys.readouterr().err


def test_loras_on_quantised_layers_run_unfused(ref21, tmp_path):
    """A LoRA on a GGUF transformer applies beside the quantised layers: the same picture as the same LoRA on the
    dequantised weights (within 2/255); fusing into the blocks is refused with the reason."""
    from tests.lora_files import linear_shapes, random_lora, write_lora

    _, folder = ref21
    path = tmp_path / "t.gguf"
    mixed_gguf(folder, path)
    plain = qimg.load(folder, dtype="float32")
    lora = write_lora(tmp_path / "l.safetensors", random_lora(linear_shapes(plain.transformer), std=0.3))
    quant = qimg.load(folder, dtype="float32", transformer=path, loras=[(lora, 0.8)], lora_mode="unfused")
    got = quant.generate("a cat", width=64, height=64, steps=2, seed=1)[0]
    plain.transformer.load_state_dict({k: t.dequantize(torch.float32) for k, t in read_gguf(path).items()})
    plain.set_loras([(lora, 0.8)], fused=False)
    expected = plain.generate("a cat", width=64, height=64, steps=2, seed=1)[0]
    assert max_diff(got, expected) <= 2
    quant.unload_loras()
    without = quant.generate("a cat", width=64, height=64, steps=2, seed=1)[0]
    assert max_diff(got, without) > 2  # the LoRA did something
    with pytest.raises(InputError, match="LoRAs cannot be merged into quantized weights"):
        quant.set_loras([(lora, 0.8)], fused=True)


def test_kquant_transformer_stays_quantised_and_computes_its_weights(tmp_path):
    """A 2.x transformer of width 256 (K-quant rows tile) written with Q4_K, Q5_K and Q6_K Linear weights: they stay
    quantised when loaded, and the output is the float32 model's on the same (dequantised) weights."""
    from qimg.lowbit.load import load_gguf_module
    from qimg.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer

    cfg = QwenImage21Config(num_layers=1, attention_head_dim=128, num_attention_heads=2, axes_dims_rope=(16, 56, 56),
                            in_channels=16, out_channels=16, context_in_dim=256, mlp_ratio=1)
    torch.manual_seed(0)
    model = QwenImage21Transformer(cfg).eval()
    kinds = itertools.cycle(["Q4_K", "Q5_K", "Q6_K"])
    written = write_gguf(model.state_dict(), tmp_path / "k.gguf",
                         lambda name, t: next(kinds) if t.ndim == 2 and name.endswith(".weight") else "F32")
    assert {"Q4_K", "Q5_K", "Q6_K"} <= set(written.values())
    loaded = load_gguf_module(lambda: QwenImage21Transformer(cfg), tmp_path / "k.gguf", dtype=torch.float32,
                              device="cpu")
    quantised = {m.kind for m in loaded.modules() if isinstance(m, QuantLinear)}
    assert {"Q4_K", "Q5_K", "Q6_K"} <= quantised
    twin = QwenImage21Transformer(cfg).eval()
    twin.load_state_dict({k: t.dequantize(torch.float32) for k, t in read_gguf(tmp_path / "k.gguf").items()})
    g = torch.Generator().manual_seed(1)
    inputs = dict(latents=torch.randn(1, 16, 16, generator=g), text=torch.randn(1, 6, 256, generator=g),
                  sigma=torch.tensor([0.7]), slot_mask=torch.zeros(6, dtype=torch.bool), shape=(4, 4))
    with torch.inference_mode():
        got, expected, exact = loaded(**inputs), twin(**inputs), model(**inputs)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert 0 < float((got - exact).norm() / exact.norm()) < 0.1  # quantised: close to, not equal to, the original
