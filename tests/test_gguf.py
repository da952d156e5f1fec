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
