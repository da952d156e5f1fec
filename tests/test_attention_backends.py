"""The GPU attention kernels behind the backend seam: named backends `flash` and `sage` need their packages (a clear
refusal otherwise); where the kernel applies (CUDA, half precision, no mask) the call goes to it with qimg's
`[B, S, H, D]` layout, elsewhere to sdpa."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from qimg.errors import InputError
from qimg.models import attention
from qimg.options import LoadOptions


@pytest.mark.parametrize("name,package", [("flash", "flash-attn"), ("sage", "sageattention")])
def test_missing_package_is_named(name, package, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda module: None)
    with pytest.raises(InputError, match=f"needs the {package} package on a CUDA GPU"):
        LoadOptions(attention=name)


@pytest.mark.parametrize("name,module,function", [("flash", "flash_attn", "flash_attn_func"),
                                                  ("sage", "sageattention", "sageattn")])
def test_kernel_gets_the_call_where_it_applies(name, module, function, monkeypatch):
    calls = []

    def kernel(q, k, v, **kwargs):
        calls.append(kwargs)
        return attention.sdpa(q, k, v)

    fake = types.ModuleType(module)
    setattr(fake, function, kernel)
    monkeypatch.setitem(sys.modules, module, fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda m: object())
    backend = attention.attention_backend(name)
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    mask = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    assert torch.equal(backend(q, k, v), attention.sdpa(q, k, v)) and not calls  # CPU float32: sdpa
    monkeypatch.setattr(attention, "kernel_applies", lambda q, mask: mask is None)
    assert torch.allclose(backend(q, k, v), attention.sdpa(q, k, v)) and len(calls) == 1
    backend(q, k, v, mask)  # a mask: never the kernel
    assert len(calls) == 1
    if name == "sage":
        assert calls[0] == {"tensor_layout": "NHD", "is_causal": False}
