"""Memory of a low-bit transformer at the official sizes, on CPU: a file of random quantised weights with sane scales
(the official state-dict keys and shapes from tests/contracts) is loaded with qimg's single-file path
(`--transformer FILE`) in a fresh process.

    python bench/lowbit_memory.py [--model 2.1|v1] [--kind Q4_K|Q5_K|Q6_K|Q8_0|Q4_0|int8|fp8] [--keep DIR]

Kinds: the GGUF K-quant / block kinds (a .gguf of random blocks, loaded with `load_gguf_module`; Linear weights whose
rows a block cannot tile stay F16) and the weight-only kinds `qimg quantize --format int8|fp8` writes (a .safetensors
loaded with `load_safetensors_module`): `int8` is int8 Linear weights with one float32 `scale_weight` per output row
(`[out]`), `fp8` is ComfyUI's "scaled fp8", float8_e4m3fn Linear weights with one float32 `scale_weight` per tensor
(`[1]`) and an empty `scaled_fp8` marker; every other tensor is bfloat16 and the header carries {"qimg.format": kind}.
That layout is first checked against what qimg's own `quantize_transformer` writes for a tiny model; the file is then
written tensor by tensor (safetensors header + raw bytes, random int8 in [-127, 127] or randn cast to e4m3, so no NaN
encodings), never holding the model in memory.

Reports the weights' bytes as they sit in memory (quantised weights + the other tensors, scales included, in
bfloat16/float32), the process's RSS after loading (files are memory-mapped: only what is touched is resident), its
RSS and peak RSS after every quantised weight has been read once (what a full denoising step touches; the read
allocates nothing: earlier runs summed each weight in int64, whose transient of 8 bytes a weight of one layer was in
their peak), its peak RSS after a second pass dequantising each Linear's weight to bfloat16 as forward does (one
layer's transient on top) and the seconds the load, the read (from the disk: the file is dropped from the page cache
after writing) and the dequantising took. Prints a table and writes bench/results/lowbit_memory-<model>-<kind>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONTRACTS = {"2.1": "keys_QwenImage21Transformer2DModel.txt", "v1": "keys_QwenImageTransformer2DModel.txt"}
SCALE_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,), "Q4_0": (0,)}
WEIGHT_ONLY = ("int8", "fp8")  # `qimg quantize --format int8|fp8`: .safetensors
ITEMSIZE = {"F32": 4, "BF16": 2, "I8": 1, "F8_E4M3": 1}
INT8_SCALE = 0.02 / 74  # uniform int8 in [-127, 127] has a std of ~74: weights of std ~0.02
FP8_SCALE = 0.02  # randn in e4m3 (std 1): weights of std ~0.02
CHUNK = 64 << 20  # bytes generated and written at a time


def write_random_gguf(model: str, kind: str, path: Path) -> dict:
    import gguf

    from tests.contracts import read_contract

    _, keys = read_contract(CONTRACTS[model])
    qtype = gguf.GGMLQuantizationType[kind]
    elements, nbytes = gguf.constants.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "qwen_image", use_temp_file=True)
    counts = {"quantised": 0, "other": 0}
    for key, (shape, _) in keys.items():
        if len(shape) == 2 and key.endswith(".weight") and shape[1] % elements == 0:
            blocks = rng.integers(0, 256, (shape[0], shape[1] // elements * nbytes), dtype=np.uint8)
            for k, offset in enumerate(SCALE_FIELDS[kind]):
                view = blocks.reshape(-1, nbytes)
                view[:, offset:offset + 2] = np.full(view.shape[0], 0.01 if not k else -0.01,
                                                     np.float16).view(np.uint8).reshape(-1, 2)
            writer.add_tensor(key, blocks, raw_dtype=qtype)
            counts["quantised"] += shape[0] * shape[1]
        else:
            writer.add_tensor(key, (rng.standard_normal(shape) * 0.02).astype(np.float16))
            counts["other"] += int(np.prod(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return counts


def weight_only_layout(keys: dict[str, tuple], kind: str) -> tuple[dict[str, tuple[str, list]], dict[str, str]]:
    """({name: (safetensors dtype, shape)}, metadata) of the file `qimg quantize --format kind` writes for a model
    with `keys` ({name: (shape, ...)}), mirroring qimg.lowbit.convert.quantize_transformer."""
    layout = {}
    for key, (shape, *_) in keys.items():
        if len(shape) == 2 and key.endswith(".weight"):  # qimg.lowbit.write.is_linear_weight
            layout[key] = ("I8" if kind == "int8" else "F8_E4M3", list(shape))
            layout[f"{key[:-len('.weight')]}.scale_weight"] = ("F32", [shape[0]] if kind == "int8" else [1])
        else:
            layout[key] = ("BF16", list(shape))
    if kind == "fp8":
        layout["scaled_fp8"] = ("F8_E4M3", [0])
    return layout, {"qimg.format": kind}


def read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(n))


def check_layout(kind: str) -> None:
    """weight_only_layout agrees with the file qimg's own quantize_transformer writes for a tiny model (names,
    dtypes, shapes, metadata), else AssertionError naming the difference."""
    import torch

    from qimg.loading.weights import save_state_dict
    from qimg.lowbit.convert import quantize_transformer

    tiny = {"blocks.0.proj.weight": torch.randn(4, 8), "blocks.0.proj.bias": torch.randn(4),
            "blocks.0.norm.weight": torch.randn(8), "head.weight": torch.randn(3, 4)}
    with tempfile.TemporaryDirectory(prefix="qimg-lowbit-layout-") as folder:
        (Path(folder) / "transformer").mkdir()
        save_state_dict(tiny, Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")
        quantize_transformer(folder, Path(folder) / f"tiny-{kind}.safetensors", kind)
        header = read_safetensors_header(Path(folder) / f"tiny-{kind}.safetensors")
    metadata = header.pop("__metadata__", {})
    written = {k: (v["dtype"], v["shape"]) for k, v in header.items()}
    layout, meta = weight_only_layout({k: (list(t.shape),) for k, t in tiny.items()}, kind)
    assert written == layout and metadata == meta, f"qimg writes {written} {metadata}, this bench {layout} {meta}"


def random_values(dtype: str, shape: list, generator):
    """Random tensor of `shape` in `dtype`, as uint8 bytes, in chunks of rows (each at most ~CHUNK bytes)."""
    import torch

    rows, cols = (shape[0], int(np.prod(shape[1:]))) if shape else (1, 1)
    step = max(1, CHUNK // max(1, cols * ITEMSIZE[dtype]))
    for start in range(0, rows, step):
        size = (min(step, rows - start), cols)
        if dtype == "I8":
            chunk = torch.randint(-127, 128, size, dtype=torch.int8, generator=generator)
        elif dtype == "F8_E4M3":  # |randn| < 448: never a NaN encoding (0x7F / 0xFF)
            chunk = torch.randn(size, generator=generator).to(torch.float8_e4m3fn)
        else:
            chunk = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
        yield chunk.reshape(-1).view(torch.uint8).numpy()


def write_random_weight_only(model: str, kind: str, path: Path) -> dict:
    """A .safetensors in the layout `qimg quantize --format kind` writes, of random values, streamed tensor by
    tensor (header first, then each tensor's bytes in chunks; scales first, then bfloat16, then one-byte weights, so
    every tensor is aligned to its item size as the safetensors writer does)."""
    import torch

    from tests.contracts import read_contract

    _, keys = read_contract(CONTRACTS[model])
    layout, metadata = weight_only_layout(keys, kind)
    order = sorted(layout, key=lambda k: -ITEMSIZE[layout[k][0]])  # stable: file order within a size
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        dtype, shape = layout[name]
        end = offset + int(np.prod(shape)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(0)
    counts = {"quantised": 0, "other": 0, "scales": 0}
    with open(path, "wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name in order:
            dtype, shape = layout[name]
            if name.endswith(".scale_weight"):
                value = INT8_SCALE if kind == "int8" else FP8_SCALE
                handle.write(np.full(shape, value, np.float32).tobytes())
                counts["scales"] += int(np.prod(shape))
                continue
            for chunk in random_values(dtype, shape, generator) if np.prod(shape) else ():
                handle.write(chunk)
            counts["quantised" if ITEMSIZE[dtype] == 1 else "other"] += int(np.prod(shape))
    size = path.stat().st_size
    assert size == 8 + len(raw) + offset, f"{path}: {size} bytes written, {8 + len(raw) + offset} meant"
    from safetensors import safe_open  # the reference reader accepts the file (header, offsets, coverage)

    with safe_open(str(path), framework="pt") as check:
        assert set(check.keys()) == set(layout) and check.metadata() == metadata
    return counts


CHILD = r"""
import json, resource, sys, time, torch
import psutil
from qimg.lowbit.load import load_gguf_module, load_safetensors_module
from tests.contracts import read_contract
model, path, contract = sys.argv[1], sys.argv[2], sys.argv[3]
config, _ = read_contract(contract)
config = {k: v for k, v in config.items() if not k.startswith("_")}
if model == "2.1":
    from qimg.models.qwenimage21 import QwenImage21Config as C, QwenImage21Transformer as M
else:
    from qimg.models.qwenimage import QwenImageConfig as C, QwenImageTransformer as M
load = load_gguf_module if path.endswith(".gguf") else load_safetensors_module  # as --transformer FILE picks
before = psutil.Process().memory_info().rss
start = time.perf_counter()
module = load(lambda: M(C.from_dict(config)), path, dtype=torch.bfloat16, device="cpu")
load_s = time.perf_counter() - start
loaded = psutil.Process().memory_info().rss
layers = [m for m in module.modules() if getattr(m, "quantized_weights", False)]  # QuantLinear, ScaledLinear
stored = {id(m.blocks) for m in layers}  # GGUF blocks or int8/fp8 qweight
blocks = sum(m.blocks.numel() * m.blocks.element_size() for m in layers)
others = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if id(t) not in stored)
start = time.perf_counter()
for m in layers:  # read every quantised weight once, as a denoising step does; max() allocates nothing
    m.blocks.view(torch.uint8).max()
read_s = time.perf_counter() - start
touched = psutil.Process().memory_info().rss
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
token = {}
for m in layers:  # each layer's forward on one token: its unpacking transient on top of the resident weights
    x = token.setdefault(m.in_features, torch.zeros(1, m.in_features, dtype=torch.bfloat16))
    m(x)
dequantize_s = time.perf_counter() - start
peak_dequantized = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"weights_bytes": blocks + others, "quantised_bytes": blocks, "other_bytes": others,
                  "quantised_layers": len(layers), "rss_before": before, "rss_loaded": loaded,
                  "rss_all_blocks_read": touched, "peak_rss": peak, "peak_rss_dequantized": peak_dequantized,
                  "load_s": load_s, "read_s": read_s, "dequantize_s": dequantize_s}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(CONTRACTS), default="2.1")
    p.add_argument("--kind", default="Q4_K", choices=[*sorted(SCALE_FIELDS), *WEIGHT_ONLY])
    p.add_argument("--keep", default=None, help="folder to write the file into (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.kind in WEIGHT_ONLY:
        check_layout(args.kind)  # before writing gigabytes
    folder = Path(args.keep or tempfile.mkdtemp(prefix="qimg-lowbit-mem-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{args.model}-{args.kind}.{'safetensors' if args.kind in WEIGHT_ONLY else 'gguf'}"
    try:
        return measure(args.model, args.kind, path)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            folder.rmdir()


def measure(model: str, kind: str, path: Path) -> int:
    """Write the random file at `path`, load it in a fresh process, print the table and write the results."""
    start = time.perf_counter()
    counts = (write_random_weight_only if kind in WEIGHT_ONLY else write_random_gguf)(model, kind, path)
    fd = os.open(path, os.O_RDONLY)
    try:  # on disk, and out of the page cache: the child's first read comes from the disk, as after a reboot
        os.fsync(fd)
        written = time.perf_counter() - start
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    child = subprocess.run([sys.executable, "-c", CHILD, model, str(path), CONTRACTS[model]], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if child.returncode:
        print(child.stderr[-3000:])
        return 1
    result = json.loads(child.stdout.strip().splitlines()[-1])
    gib = 1024**3
    print(f"{model} transformer, {kind} Linear weights ({counts['quantised'] / 1e9:.2f} B weights; "
          f"{counts['other'] / 1e6:.1f} M other), file {path.stat().st_size / gib:.2f} GiB written in {written:.0f} s")
    for name in ("weights_bytes", "quantised_bytes", "other_bytes", "rss_before", "rss_loaded", "rss_all_blocks_read",
                 "peak_rss", "peak_rss_dequantized"):
        print(f"  {name:<22} {result[name] / gib:8.2f} GiB  {result[name] / 1e9:8.2f} GB")
    for name in ("load_s", "read_s", "dequantize_s"):
        print(f"  {name:<22} {result[name]:8.2f} s")
    out = ROOT / "bench" / "results" / f"lowbit_memory-{model}-{kind}.json"
    from qimg.atomic import atomic_write

    with atomic_write(out, "w") as handle:
        json.dump({"model": model, "kind": kind, **counts, "file_bytes": path.stat().st_size, "write_s": written,
                   **result, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                         "platform": platform.platform()},
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, handle, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
