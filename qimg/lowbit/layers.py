"""A Linear layer whose weight stays quantised: the blocks live on the layer's device (uint8, a quarter to a half of
bfloat16's bytes) and are dequantised just before the matrix product, in the activations' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qimg.lowbit.gguf_blocks import dequantize
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"
