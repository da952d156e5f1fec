"""Weight-only int8 and fp8 (e4m3) Linear layers, quantised on load: each output row keeps one float32 scale
(absmax / 127, or / 448 for e4m3), the weights take one byte each, and a layer dequantises its weight in the
activations' dtype just before the product. On a GPU with fp8 units (compute capability 8.9+) an fp8 layer instead
quantises its activations per token to e4m3 and runs a real fp8 matmul (`torch._scaled_mm`, the two scales applied to
its float32 accumulator); `fp8_matmul` forces either way (the fp8 product also runs on CPU, which tests use)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qimg.errors import InputError, first_line
from qimg.lowbit.layers import chunked_linear

KINDS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def quantize_weight(weight: torch.Tensor, kind: str, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-byte values, float32 scale) with `values * scale ~ weight`: absmax / 127 (int8, rounded) or / 448 (fp8
    e4m3), one scale per output row (`[out, 1]`) or, with `per_row=False`, one for the tensor (`[]`)."""
    storage, top = KINDS[kind]
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1, keepdim=True) if per_row else weight.abs().amax()
    scale = absmax.clamp_min(1e-12) / top
    scaled = weight / scale
    return (scaled.round().clamp(-top, top) if kind == "int8" else scaled).to(storage), scale


class ScaledLinear(nn.Module):
    quantized_weights = True  # LoRAs apply beside it (unfused), never merged into it

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        values, scale = quantize_weight(linear.weight, kind)
        self.kind, self.compute_dtype = kind, linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", values)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @classmethod
    def from_stored(cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    compute_dtype: torch.dtype) -> "ScaledLinear":
        """A layer from a file's already-quantised weight (float8_e4m3fn or int8) and its scale (one per tensor,
        `[]` or `[1]`, or one per output row)."""
        kind = {torch.float8_e4m3fn: "fp8", torch.int8: "int8"}.get(qweight.dtype)
        if kind is None or qweight.ndim != 2:
            raise ValueError(f"a stored quantised weight must be a 2-D float8_e4m3fn or int8 tensor, got "
                             f"{qweight.dtype} {tuple(qweight.shape)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.kind, layer.compute_dtype = kind, compute_dtype
        layer.out_features, layer.in_features = qweight.shape
        scale = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1, 1)
        layer.register_buffer("qweight", qweight)
        layer.register_buffer("scale", scale)
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return layer

    fp8_matmul: bool | None = None  # None: an fp8 matmul where the device has fp8 units; True/False: forced

    @property
    def blocks(self) -> torch.Tensor:  # where the weight lives (qimg.models.layers.layer_device)
        return self.qweight

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight, `qweight * scale`, in `dtype` (the layer's own product unpacks it by `rows`)."""
        return self.rows(0, self.out_features, dtype)

    def rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        scale = self.scale[start:stop] if self.scale.shape[0] > 1 else self.scale
        return (self.qweight[start:stop].float() * scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "fp8" and self._fp8_product(x):
            try:
                return fp8_linear(x, self.qweight, self.scale, self.bias)
            except RuntimeError as err:  # a GPU whose kernels lack this scaling mode: dequantise from now on
                if self.fp8_matmul:
                    raise
                self.fp8_matmul = False
                warnings.warn(f"fp8 matmul unavailable here ({first_line(err)}); this layer dequantises "
                              f"its fp8 weight instead", RuntimeWarning, stacklevel=2)
        return chunked_linear(x, self.rows, self.out_features, self.bias)

    def _fp8_product(self, x: torch.Tensor) -> bool:
        if self.fp8_matmul is not None:
            return self.fp8_matmul
        return (x.dtype == torch.bfloat16 and has_fp8_units(x.device) and self.in_features % 16 == 0
                and self.out_features % 16 == 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def has_fp8_units(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """`x @ (weight * scale).T + bias` as an fp8 product: `x` quantised per token (absmax / 448) to e4m3, the
    float8 weight used as stored; `scale` is the weight's, one per output row or one for the tensor."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 448.0
    x8 = (rows.float() / x_scale).to(torch.float8_e4m3fn)
    pad = (-x8.shape[0]) % 16 if x.is_cuda else 0  # the CUDA kernel takes rows in multiples of 16
    if pad:
        x8 = torch.cat([x8, x8.new_zeros(pad, x8.shape[1])])
        x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
    w_scale = scale.float().reshape(1, -1).expand(1, weight.shape[0]).contiguous()
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype  # row-wise scales give bfloat16 on CUDA
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    out = out[: rows.shape[0]].to(x.dtype)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def quantize_linears(module: nn.Module, kind: str) -> nn.Module:
    """Every nn.Linear of `module` replaced by its weight-only `kind` twin (in place; returns the module)."""
    if kind not in KINDS:
        raise InputError(f"quantize must be one of {sorted(KINDS)}, got {kind!r}")
    names = [name for name, sub in module.named_modules() if type(sub) is nn.Linear]
    for name in names:
        module.set_submodule(name, ScaledLinear(module.get_submodule(name), kind))
    return module
