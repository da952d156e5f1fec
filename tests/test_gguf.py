"""GGUF block formats: qimg's torch dequantisation equals the `gguf` package's to the last bit, on blocks its own
quantisers write and on random blocks with sane float16 scales (valid data for the K-quants, which gguf-py reads but
does not write)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

from qimg.lowbit.gguf_blocks import FORMATS, dequantize  # noqa: E402

SCALES = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
QUANTIZED = [name for name in FORMATS if name not in ("F32", "F16", "BF16")]


def random_blocks(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random block bytes whose float16 scale fields hold sane values (1e-4 .. 1e-1, either sign for the mins)."""
    rng = np.random.default_rng(seed)
    elements, nbytes = GGML_QUANT_SIZES[T[name]]
    raw = rng.integers(0, 256, (rows * cols // elements, nbytes), dtype=np.uint8)
    for k, offset in enumerate(SCALES[name]):
        values = rng.uniform(1e-4, 1e-1, raw.shape[0]) * (rng.choice([-1, 1], raw.shape[0]) if k else 1)
        raw[:, offset:offset + 2] = values.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def ours(raw: np.ndarray, name: str, shape) -> np.ndarray:
    return dequantize(torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1), name, shape).numpy()


def test_block_sizes_are_ggmls():
    for name, fmt in FORMATS.items():
        assert GGML_QUANT_SIZES[T[name]] == (fmt.elements, fmt.nbytes), name


@pytest.mark.parametrize("name", QUANTIZED)
def test_random_blocks_dequantise_like_gguf(name):
    for seed, (rows, cols) in enumerate([(4, 256), (16, 768), (3, 2048)]):
        raw = random_blocks(name, rows, cols, seed)
        expected = gguf.quants.dequantize(raw, T[name])
        got = ours(raw, name, (rows, cols))
        assert expected.shape == got.shape and np.isfinite(expected).all()
        assert np.array_equal(expected, got), (name, rows, cols, np.abs(expected - got).max())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"])
def test_what_gguf_writes_reads_back_like_gguf(name):
    weights = np.random.default_rng(1).standard_normal((24, 320)).astype(np.float32)
    raw = gguf.quants.quantize(weights, T[name])
    expected = gguf.quants.dequantize(raw, T[name])
    got = ours(raw.view(np.uint8), name, weights.shape)
    assert np.array_equal(expected, got)
    if name == "Q8_0":
        assert np.abs(got - weights).max() < 0.02 * np.abs(weights).max()  # and it is the weights, roughly


def test_on_the_device_of_the_blocks_and_refusals():
    raw = torch.from_numpy(random_blocks("Q4_K", 2, 256, 5)).reshape(-1)
    assert dequantize(raw, "Q4_K", (2, 256)).dtype == torch.float32
    with pytest.raises(ValueError, match="quantization type IQ2_XXS is not supported"):
        dequantize(raw, "IQ2_XXS", (2, 256))
    with pytest.raises(ValueError, match=r"Q4_K data of 288 bytes cannot hold a tensor of shape \(3, 256\)"):
        dequantize(raw, "Q4_K", (3, 256))


KQUANT_ERROR = {"Q4_K": ("Q4_0", 0.08), "Q5_K": ("Q5_0", 0.042), "Q6_K": ("Q8_0", 0.025)}


@pytest.mark.parametrize("name", sorted(KQUANT_ERROR))
def test_kquant_writer_reads_back_like_gguf(name):
    """qimg's K-quant encoder: gguf's own dequantisation reads its blocks (ours equals it bit for bit), the weights
    come back within the format's error, tighter than the 32-block format of as many bits."""
    from qimg.lowbit.kquants import quantize

    rng = np.random.default_rng(3)
    weights = (rng.standard_normal((48, 768)) * 0.05).astype(np.float32)
    weights[1] += 0.3  # all positive: the min is 0
    weights[2] -= 0.3  # all negative
    weights[4] = 0.0
    weights[5, :256] = 1e-6
    raw = quantize(torch.from_numpy(weights), name).numpy()
    assert raw.shape == (48, 768 // 256 * GGML_QUANT_SIZES[T[name]][1])
    expected = gguf.quants.dequantize(raw, T[name])
    assert np.array_equal(expected, ours(raw, name, weights.shape))
    assert np.array_equal(expected[4], np.zeros(768, np.float32))
    error = np.linalg.norm(expected - weights) / np.linalg.norm(weights)
    legacy_name, bound = KQUANT_ERROR[name]
    legacy = gguf.quants.dequantize(gguf.quants.quantize(weights, T[legacy_name]), T[legacy_name])
    if name != "Q6_K":  # Q6_K stands in for 8-bit only where rows do not tile; it is coarser than Q8_0
        assert error < np.linalg.norm(legacy - weights) / np.linalg.norm(weights)
    assert error < bound, error


def test_kquant_rows_that_do_not_tile(tmp_path):
    from qimg.lowbit.gguf_file import read_gguf
    from qimg.lowbit.kquants import quantize
    from qimg.lowbit.write import write_gguf

    with pytest.raises(ValueError, match="Q4_K needs rows of a multiple of 256 weights; this tensor's rows have 96"):
        quantize(torch.zeros(2, 96), "Q4_K")
    sd = {"a.weight": torch.randn(4, 512), "b.weight": torch.randn(4, 96), "c.weight": torch.randn(4, 64),
          "d.weight": torch.randn(4, 20)}
    chosen = write_gguf(sd, tmp_path / "x.gguf", lambda name, t: "Q6_K")
    assert chosen == {"a.weight": "Q6_K", "b.weight": "Q8_0", "c.weight": "Q8_0", "d.weight": "F32"}
    assert {k: t.kind for k, t in read_gguf(tmp_path / "x.gguf").items()} == chosen


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "BF16"])
def test_dequantised_a_chunk_at_a_time_is_the_same(name, monkeypatch):
    """Large tensors are decoded a few weights at a time into the target dtype: the same bits as decoding all of it
    in float32 and casting (forced here with a tiny chunk)."""
    from qimg.lowbit import gguf_blocks

    if name == "BF16":
        raw = torch.randn(8, 1024).to(torch.bfloat16).view(torch.uint8).numpy()
    else:
        raw = random_blocks(name, 8, 1024, 7)
    tensor = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1)
    whole = dequantize(tensor, name, (8, 1024)).to(torch.bfloat16)
    monkeypatch.setattr(gguf_blocks, "CHUNK_WEIGHTS", 512)
    assert torch.equal(dequantize(tensor, name, (8, 1024), torch.bfloat16), whole)


def test_scaled_linear_unpacks_its_rows():
    from torch import nn

    from qimg.lowbit import weight_only

    layer = weight_only.ScaledLinear(nn.Linear(64, 40), "int8")
    whole = (layer.qweight.float() * layer.scale).to(torch.bfloat16)
    assert torch.equal(layer.dequantized(torch.bfloat16), whole)
    assert torch.equal(layer.rows(7, 19, torch.bfloat16), whole[7:19])


def test_big_quantised_layers_multiply_a_block_of_rows_at_a_time(monkeypatch):
    """A large packed weight is never unpacked whole: its product is computed a block of rows at a time into the
    output: the product of unpacking it all, up to float rounding (GGUF and int8 layers; forced with a tiny block)."""
    from torch import nn

    from qimg.lowbit import layers as quant_layers
    from qimg.lowbit.gguf_file import QuantTensor
    from qimg.lowbit.layers import QuantLinear
    from qimg.lowbit.weight_only import ScaledLinear

    raw = torch.from_numpy(random_blocks("Q8_0", 48, 64, 3)).reshape(-1)
    gguf_layer = QuantLinear(QuantTensor(raw, "Q8_0", (48, 64)), torch.randn(48), torch.float32)
    int8_layer = ScaledLinear(nn.Linear(64, 48), "int8")
    x = torch.randn(2, 5, 64)
    for layer in (gguf_layer, int8_layer):
        expected = torch.nn.functional.linear(x, layer.dequantized(torch.float32), layer.bias)
        monkeypatch.setattr(quant_layers, "CHUNK_WEIGHTS", 64 * 7)  # 7 rows at a time: a short last block
        got = layer(x)
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6
        monkeypatch.undo()
