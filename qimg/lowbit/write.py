"""Writing a state dict as a GGUF file, atomically: the `gguf` package's quantisers (Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1), qimg's K-quant encoders (Q4_K, Q5_K, Q6_K: `qimg.lowbit.kquants`), F16 / BF16 / F32 kept as they are.
`kind_of(name, tensor)` picks each tensor's format; a tensor whose rows a K-quant cannot tile takes its FALLBACK, and
one whose rows no block can tile stays F32."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from qimg.atomic import atomic_path
from qimg.lowbit import kquants
from qimg.lowbit.gguf_blocks import FORMATS
from qimg.lowbit.kquants import KQUANTS

# rows a K-quant block (256 weights) cannot tile take the 32-weight format of about as many bits, as llama.cpp does
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
WRITABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def is_linear_weight(name: str, tensor) -> bool:
    """A Linear layer's weight (2-D, named `.weight`): what low-bit formats store quantised."""
    return tensor.ndim == 2 and name.endswith(".weight")


def linear_weights(kind: str) -> Callable[[str, torch.Tensor], str]:
    """`kind` for the 2-D weights of Linear layers, F32 for everything else (norms, biases, embeddings' 1-D parts)."""
    return lambda name, tensor: kind if is_linear_weight(name, tensor) else "F32"


def write_gguf(state_dict: dict[str, torch.Tensor], path: str | Path, kind_of: Callable[[str, torch.Tensor], str],
               *, arch: str = "qwen_image") -> dict[str, str]:
    """Write `state_dict` to `path`; returns the format each tensor got."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    chosen = {}
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        for name, tensor in state_dict.items():
            kind = kind_of(name, tensor)
            if kind not in WRITABLE:
                raise ValueError(f"qimg writes {', '.join(WRITABLE)}; {name} asked for {kind}")
            if tensor.shape[-1] % FORMATS[kind].elements:
                kind = FALLBACK.get(kind, "F32")
                if tensor.shape[-1] % FORMATS[kind].elements:
                    kind = "F32"
            qtype = GGMLQuantizationType[kind]
            if kind in KQUANTS:
                data = kquants.quantize(tensor, kind).numpy()
            else:
                array = tensor.detach().float().cpu().numpy()
                data = quants.quantize(array, qtype) if kind not in ("F32", "F16") else array.astype(
                    np.float16 if kind == "F16" else np.float32)
            writer.add_tensor(name, data, raw_shape=data.shape if kind in ("F32", "F16") else None, raw_dtype=qtype)
            chosen[name] = kind
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return chosen
