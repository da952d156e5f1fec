"""`qimg quantize`: a model's transformer written as one low-bit file that `--transformer FILE` loads.

Formats: GGUF (`gguf-q8_0`, `gguf-q6_k`, `gguf-q5_k`, `gguf-q5_1`, `gguf-q5_0`, `gguf-q4_k`, `gguf-q4_1`,
`gguf-q4_0`, `gguf-f16`, `gguf-bf16`: the Linear weights in that type (rows a block cannot tile stay F32), the rest
F32, through the `gguf` package's writer; K-quants through qimg's encoders) and safetensors
(`fp8`: ComfyUI's "scaled fp8", float8_e4m3fn weights with one `scale_weight` per tensor, the rest bfloat16;
`int8`: int8 weights with one scale per output row in `scale_weight`, the rest bfloat16). Written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qimg.errors import InputError

GGUF = {f"gguf-{k.lower()}": k for k in ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "F16",
                                         "BF16")}
FORMATS = (*GGUF, "fp8", "int8")


def quantize_transformer(folder: str | Path, out: str | Path, fmt: str,
                         progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Write `folder`'s transformer to `out` in `fmt`; returns {format: tensor count}."""
    import torch

    from qimg.loading.weights import open_state_dict, save_state_dict
    from qimg.lowbit.write import is_linear_weight, write_gguf

    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    wanted = ".gguf" if fmt in GGUF else ".safetensors"
    if out.suffix.lower() != wanted:
        raise InputError(f"format {fmt} writes a {wanted} file; the output is {out.name}")
    sd = open_state_dict(Path(folder) / "transformer")
    total, done = len(sd), [0]

    def step():
        done[0] += 1
        if progress:
            progress(done[0], total)

    if fmt in GGUF:
        def kind_of(name, tensor):
            step()
            return GGUF[fmt] if is_linear_weight(name, tensor) else "F32"

        kinds = write_gguf(sd, out, kind_of)
        counts: dict[str, int] = {}
        for kind in kinds.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts
    from qimg.lowbit.weight_only import quantize_weight

    content, counts = {}, {fmt: 0, "bfloat16": 0}
    for name, tensor in sd.items():
        step()
        if not is_linear_weight(name, tensor):
            content[name] = tensor.to(torch.bfloat16)
            counts["bfloat16"] += 1
            continue
        content[name], scale = quantize_weight(tensor, fmt, per_row=fmt == "int8")  # ComfyUI's fp8: one scale
        content[f"{name[:-len('.weight')]}.scale_weight"] = scale.reshape(-1) if fmt == "int8" else scale.reshape(1)
        counts[fmt] += 1
    if fmt == "fp8":
        content["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_state_dict(content, out, metadata={"qimg.format": fmt})
    return counts
