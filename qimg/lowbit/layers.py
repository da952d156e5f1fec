"""A Linear layer whose weight stays quantised: the blocks live on the layer's device (uint8, a quarter to a half of
bfloat16's bytes) and are dequantised just before the matrix product, in the activations' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qimg.lowbit.gguf_blocks import CHUNK_WEIGHTS, dequantize
from qimg.lowbit.gguf_file import QuantTensor


class QuantLinear(nn.Module):
    quantized_weights = True  # LoRAs apply beside it (unfused), never merged into it

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype  # what the run computes in (qimg.models.layers.layer_dtype)
        self.kind, self.shape = weight.kind, tuple(weight.shape)
        self.out_features, self.in_features = self.shape
        self.register_buffer("blocks", weight.raw, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.blocks, self.kind, self.shape, dtype)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows `start:stop` of the weight, unpacked (blocks never straddle rows)."""
        per_row = self.blocks.numel() // self.out_features
        return dequantize(self.blocks[start * per_row:stop * per_row], self.kind, (stop - start, self.in_features),
                          dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_linear(x, self.rows, self.out_features, self.bias)


def chunked_linear(x: torch.Tensor, rows, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ W.T + bias` for a weight kept packed: `rows(start, stop, dtype)` unpacks a block of its rows. A large
    weight is unpacked a few million weights at a time, each block's product written into the output, so no
    unpacked copy of the whole weight exists (the largest 2.x layer, 12288 x 4096, would be 100 MB in bfloat16);
    the products equal one whole product up to float rounding."""
    bias = None if bias is None else bias.to(x.dtype)
    step = max(1, CHUNK_WEIGHTS // max(1, x.shape[-1]))
    if out_features <= step:
        return F.linear(x, rows(0, out_features, x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        out[..., start:stop] = F.linear(x, rows(start, stop, x.dtype), None if bias is None else bias[start:stop])
    return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"
